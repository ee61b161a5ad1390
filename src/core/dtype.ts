/**
 * Element types. The numeric codes are the native addon's (src/native/common/dtype.h); the
 * safetensors names are the format's own.
 */
export type DType =
  | "float32"
  | "float64"
  | "bfloat16"
  | "float16"
  | "int32"
  | "int64"
  | "uint8"
  | "bool"
  | "int8"
  | "int16"

export const dtypes: ReadonlyArray<DType> = [
  "float32",
  "float64",
  "bfloat16",
  "float16",
  "int32",
  "int64",
  "uint8",
  "bool",
  "int8",
  "int16",
]

const codes: Record<DType, number> = {
  float32: 0,
  float64: 1,
  bfloat16: 2,
  float16: 3,
  int32: 4,
  int64: 5,
  uint8: 6,
  bool: 7,
  int8: 8,
  int16: 9,
}

const sizes: Record<DType, number> = {
  float32: 4,
  float64: 8,
  bfloat16: 2,
  float16: 2,
  int32: 4,
  int64: 8,
  uint8: 1,
  bool: 1,
  int8: 1,
  int16: 2,
}

export const dtypeCode = (t: DType): number => codes[t]
export const itemSize = (t: DType): number => sizes[t]
export const isFloating = (t: DType): boolean =>
  t === "float32" || t === "float64" || t === "bfloat16" || t === "float16"

const safetensorsNames: Record<DType, string> = {
  float32: "F32",
  float64: "F64",
  bfloat16: "BF16",
  float16: "F16",
  int32: "I32",
  int64: "I64",
  uint8: "U8",
  bool: "BOOL",
  int8: "I8",
  int16: "I16",
}
const fromSafetensors = new Map(Object.entries(safetensorsNames).map(([k, v]) => [v, k as DType]))

export const toSafetensorsDType = (t: DType): string => safetensorsNames[t]
/** The dtype of a safetensors name, or undefined for one this project does not support. */
export const fromSafetensorsDType = (name: string): DType | undefined => fromSafetensors.get(name)

/** The host array type for each dtype; 16-bit floats travel as their raw bits. */
export type HostArray =
  | Float32Array
  | Float64Array
  | Uint16Array
  | Int32Array
  | BigInt64Array
  | Uint8Array
  | Int8Array
  | Int16Array

export const hostArray = (t: DType, length: number): HostArray => {
  switch (t) {
    case "float32":
      return new Float32Array(length)
    case "float64":
      return new Float64Array(length)
    case "bfloat16":
    case "float16":
      return new Uint16Array(length)
    case "int32":
      return new Int32Array(length)
    case "int64":
      return new BigInt64Array(length)
    case "uint8":
    case "bool":
      return new Uint8Array(length)
    case "int8":
      return new Int8Array(length)
    case "int16":
      return new Int16Array(length)
  }
}

/** A host array of dtype `t` viewing `bytes` (which must be aligned to the item size). */
export const hostArrayView = (t: DType, bytes: Uint8Array): HostArray => {
  const n = bytes.byteLength / itemSize(t)
  const { buffer, byteOffset } = bytes
  switch (t) {
    case "float32":
      return new Float32Array(buffer, byteOffset, n)
    case "float64":
      return new Float64Array(buffer, byteOffset, n)
    case "bfloat16":
    case "float16":
      return new Uint16Array(buffer, byteOffset, n)
    case "int32":
      return new Int32Array(buffer, byteOffset, n)
    case "int64":
      return new BigInt64Array(buffer, byteOffset, n)
    case "uint8":
    case "bool":
      return new Uint8Array(buffer, byteOffset, n)
    case "int8":
      return new Int8Array(buffer, byteOffset, n)
    case "int16":
      return new Int16Array(buffer, byteOffset, n)
  }
}

export const bytesOf = (a: ArrayBufferView): Uint8Array =>
  new Uint8Array(a.buffer, a.byteOffset, a.byteLength)

/** float32 -> bfloat16 bits, round to nearest even (as the native cast does). */
export const toBFloat16 = (x: number): number => {
  const f = new Float32Array([x])
  const u = new Uint32Array(f.buffer)[0]!
  if ((u & 0x7fffffff) > 0x7f800000) return ((u >>> 16) | 0x40) & 0xffff
  return ((u + 0x7fff + ((u >>> 16) & 1)) >>> 16) & 0xffff
}
export const fromBFloat16 = (bits: number): number => {
  const u = new Uint32Array([(bits & 0xffff) << 16])
  return new Float32Array(u.buffer)[0]!
}

const f16ToF32 = (h: number): number => {
  const sign = h & 0x8000 ? -1 : 1
  const exp = (h >>> 10) & 0x1f
  const mant = h & 0x3ff
  if (exp === 0) return sign * mant * 2 ** -24
  if (exp === 0x1f) return mant ? Number.NaN : sign * Number.POSITIVE_INFINITY
  return sign * (1 + mant / 1024) * 2 ** (exp - 15)
}

/**
 * Converts a host array between floating dtypes (file dtype to parameter dtype). bfloat16 to
 * float32 is exact; float32 to bfloat16 rounds to nearest even.
 */
export const convertHost = (src: ArrayBufferView, from: DType, to: DType): HostArray => {
  const input = hostArrayView(from, bytesOf(src))
  if (from === to) return input
  const n = input.length
  const out = hostArray(to, n)
  if (from === "bfloat16" && (to === "float32" || to === "float64")) {
    const bits = new Uint32Array(n)
    for (let i = 0; i < n; i++) bits[i] = (input as Uint16Array)[i]! << 16
    const f = new Float32Array(bits.buffer)
    if (to === "float32") return f
    ;(out as Float64Array).set(f)
    return out
  }
  if (to === "bfloat16") {
    const o = out as Uint16Array
    for (let i = 0; i < n; i++)
      o[i] = toBFloat16(from === "float16" ? f16ToF32((input as Uint16Array)[i]!) : Number(input[i]))
    return out
  }
  if (from === "float16") {
    for (let i = 0; i < n; i++) (out as Float32Array)[i] = f16ToF32((input as Uint16Array)[i]!)
    return out
  }
  if (!isFloating(from) || !isFloating(to))
    throw new Error(`convertHost: ${from} to ${to} is not a float conversion`)
  ;(out as Float32Array | Float64Array).set(input as Float32Array | Float64Array)
  return out
}
