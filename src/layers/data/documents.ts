/**
 * Examples into token sequences, and the loop that feeds a lane group from a dataset: the one
 * piece of the pipeline that runs both in worker threads and, with `workers: 0`, on the main
 * thread, so the two give the same batches.
 */
import type { LaneGroup, StepRows } from "../../core/data/batching.ts"
import { DatasetFieldInvalid } from "../../core/data/errors.ts"
import type { Example, RowLocation } from "../../core/data/examples.ts"
import type { Tokenizer } from "../Tokenizer.ts"
import type { DocumentReader } from "./reader.ts"

export interface DocumentOptions {
  /** Render lists of messages with the tokenizer's chat template (else they are an error). */
  readonly useChatTemplate?: boolean
}

/**
 * The training tokens of one example. Text is encoded with special tokens (BOS, and EOS when the
 * tokenizer was loaded with addEosToken, as the original trains). A chat is rendered with the
 * template and encoded without adding special tokens (the template writes them, as transformers'
 * apply_chat_template(tokenize=True)); with addEosToken an EOS is appended unless the rendered
 * text already ends with one of the EOS tokens, so every training document ends with one.
 * Throws the typed error.
 */
export const exampleTokens = (
  tokenizer: Tokenizer,
  example: Example,
  at: RowLocation,
  field: string,
  options: DocumentOptions = {},
): number[] => {
  if (typeof example === "string") return tokenizer.encode(example)
  if (!options.useChatTemplate)
    throw new DatasetFieldInvalid({
      file: at.file,
      field,
      ...(at.line === undefined ? {} : { line: at.line }),
      ...(at.row === undefined ? {} : { row: at.row }),
      detail:
        "is a list of chat messages and the chat template is off (turn on useChatTemplate / --use-chat-template)",
    })
  const ids = tokenizer.encode(tokenizer.renderChat(example), { addSpecialTokens: false })
  const last = ids.at(-1)
  if (
    tokenizer.addEosToken &&
    tokenizer.eosTokenId !== undefined &&
    (last === undefined || !tokenizer.eosTokenIds.includes(last))
  )
    ids.push(tokenizer.eosTokenId)
  return ids
}

/** Reads and tokenizes examples by number. */
export class DocumentTokens {
  constructor(
    private readonly reader: DocumentReader,
    private readonly tokenizer: Tokenizer,
    private readonly options: DocumentOptions = {},
  ) {}

  async tokens(docs: ReadonlyArray<number>): Promise<ReadonlyArray<Int32Array>> {
    const examples = await this.reader.read(docs)
    const field = this.reader.index.field
    return examples.map(({ example, at }) =>
      Int32Array.from(exampleTokens(this.tokenizer, example, at, field, this.options)),
    )
  }
}

/** Builds the group's next step: asks for documents, supplies them, until its rows can be built. */
export const driveStep = async (group: LaneGroup, documents: DocumentTokens): Promise<StepRows> => {
  for (let wants = group.wants(); wants.length > 0; wants = group.wants()) {
    const tokens = await documents.tokens(wants.map((w) => w.doc))
    wants.forEach((w, k) => {
      group.supply(w, tokens[k]!)
    })
  }
  return group.build()
}
