/** The model families: `import { LlamaForCausalLM } from "magix/models"`. */
export {
  CausalLM,
  type CausalLMClass,
  GemmaForCausalLM,
  LlamaForCausalLM,
  MistralForCausalLM,
  modelClasses,
  type Params,
  type TokenBatch,
} from "./decoder.ts"
