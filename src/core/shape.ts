/** Shapes: row-major, every dimension a non-negative integer. */
export type Shape = ReadonlyArray<number>

export const numel = (shape: Shape): number => shape.reduce((a, b) => a * b, 1)

export const shapeEquals = (a: Shape, b: Shape): boolean =>
  a.length === b.length && a.every((d, i) => d === b[i])

export const formatShape = (shape: Shape): string => `[${shape.join(", ")}]`

/** Row-major strides in elements. */
export const strides = (shape: Shape): number[] => {
  const s = new Array<number>(shape.length).fill(1)
  for (let i = shape.length - 2; i >= 0; i--) s[i] = s[i + 1]! * shape[i + 1]!
  return s
}

export const isValidShape = (shape: Shape): boolean => shape.every((d) => Number.isSafeInteger(d) && d >= 0)
