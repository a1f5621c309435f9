/**
 * qemu-img's size syntax (bytes, or a number with a power-of-1024 suffix, optionally fractional) and its
 * human size format (`72 KiB`, `1.5 MiB`).
 */

const SUFFIX: Record<string, bigint> = {
  b: 1n,
  k: 1n << 10n,
  m: 1n << 20n,
  g: 1n << 30n,
  t: 1n << 40n,
  p: 1n << 50n,
  e: 1n << 60n,
};

/** Largest accepted size: 2^63 - 1. */
export const MAX_SIZE: bigint = (1n << 63n) - 1n;

/** Result of {@link parseSize}: a value, or why it is refused (`invalid` syntax or out of `range`). */
export type SizeResult = { ok: true; value: bigint } | { ok: false; error: "invalid" | "range" };

/**
 * Parses a size as qemu-img does: leading blanks, a decimal number (fraction allowed only with a suffix
 * other than `b`) or a `0x` hexadecimal integer, then an optional suffix among b, k, M, G, T, P, E (any
 * case; powers of 1024; `defaultSuffix` when none); fractions round to the nearest byte. Values
 * ≥ 2^64 are `range`; callers check their own upper bound.
 */
export function parseSize(text: string, defaultSuffix = "b"): SizeResult {
  const m = /^[ \t\n\r\f\v]*(?:0[xX]([0-9a-fA-F]+)|([0-9]+)(?:\.([0-9]*))?|\.([0-9]+))([a-zA-Z]?)$/.exec(
    text,
  );
  if (m === null) return { ok: false, error: "invalid" };
  const [, hex, int, frac, onlyFrac, suffixRaw] = m;
  const suffix = (suffixRaw ?? "") === "" ? defaultSuffix : (suffixRaw ?? "").toLowerCase();
  const mul = SUFFIX[suffix];
  if (mul === undefined) return { ok: false, error: "invalid" };
  let value: bigint;
  if (hex !== undefined) {
    value = BigInt(`0x${hex}`) * mul;
  } else {
    const fraction = frac ?? onlyFrac ?? "";
    const whole = BigInt(int ?? "0");
    if (fraction !== "" && /[1-9]/.test(fraction) && mul === 1n) return { ok: false, error: "invalid" };
    value = whole * mul;
    if (fraction !== "") {
      const f = Number(`0.${fraction}`) * Number(mul);
      value += BigInt(Math.round(f));
    }
  }
  if (value >= 1n << 64n) return { ok: false, error: "range" };
  return { ok: true, value };
}

const UNITS = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"] as const;

/** C's `%g` with 3 significant digits for the values {@link humanSize} produces (below 1000). */
function g3(v: number): string {
  if (v === 0) return "0";
  let s = v.toPrecision(3);
  if (s.includes("e")) return s;
  if (s.includes(".")) s = s.replace(/0+$/, "").replace(/\.$/, "");
  return s;
}

/**
 * A byte count the way qemu-img's human output shows it: three significant digits and a binary unit,
 * switching to the next unit from 1000 of the current one (`1000 KiB` shows as `0.977 MiB`).
 */
export function humanSize(bytes: number): string {
  const x = bytes / (1000 / 1024);
  // frexp's exponent: x = m·2^e with m in [0.5, 1).
  const e = x > 0 ? Math.floor(Math.log2(x)) + 1 : 0;
  const i = Math.min(UNITS.length - 1, Math.max(0, Math.trunc((e - 1) / 10)));
  return `${g3(bytes / 2 ** (i * 10))} ${UNITS[i]}`;
}
