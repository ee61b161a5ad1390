/**
 * Peak dense bfloat16 tensor-core FLOP/s of the GPUs whose data sheets we know (without the 2:4
 * sparsity figure vendors also quote), for model FLOPs utilisation. An unknown device gives no
 * peak, and then no MFU is shown: a guessed denominator would make the number meaningless.
 */

// First match wins: the specific variants before the family name.
const table: ReadonlyArray<readonly [RegExp, number]> = [
  [/\bH200\b/i, 989e12],
  [/\bH100\b.*\bPCIe\b/i, 756e12],
  [/\bH100\b.*\bNVL\b/i, 835e12],
  [/\bH100\b/i, 989e12], // SXM ("NVIDIA H100 80GB HBM3")
  [/\bH800\b/i, 989e12],
  [/\bB200\b/i, 2250e12],
  [/\bA100\b/i, 312e12],
  [/\bA800\b/i, 312e12],
  [/\bL40S\b/i, 362e12],
  [/\bL40\b/i, 181e12],
  [/\bL4\b/i, 121e12],
]

/** Peak FLOP/s of one device by its name, when known. */
export const peakFlopsOf = (deviceName: string): number | undefined =>
  table.find(([pattern]) => pattern.test(deviceName))?.[1]

/** Summed over devices; unknown if any one of them is. */
export const totalPeakFlops = (deviceNames: ReadonlyArray<string>): number | undefined => {
  let total = 0
  for (const name of deviceNames) {
    const peak = peakFlopsOf(name)
    if (peak === undefined) return undefined
    total += peak
  }
  return deviceNames.length > 0 ? total : undefined
}
