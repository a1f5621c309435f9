/**
 * Number parsing as QEMU's command line does it (`qemu_strtoi64`, `qemu_strtou64`, `qemu_strtosz`,
 * `qemu_strtod_finite`, `qapi_bool_parse`), re-implemented from their observed behaviour in qemu-storage-daemon
 * 7.2: every function returns `undefined` where QEMU reports a failure.
 */

const TWO_63 = 1n << 63n;
const TWO_64 = 1n << 64n;
const isCSpace = (c: string | undefined): boolean =>
  c === " " || c === "\t" || c === "\n" || c === "\v" || c === "\f" || c === "\r";

interface Digits {
  negative: boolean;
  value: bigint;
  /** Index just past the last digit consumed. */
  end: number;
}

/**
 * C `strtoull`-style scan: leading white space, an optional sign, then digits in `base` (0 = auto: `0x` hex,
 * leading `0` octal, else decimal). Returns undefined when no digit was consumed.
 */
function scanInteger(s: string, base: 0 | 10 | 16): Digits | undefined {
  let i = 0;
  while (isCSpace(s[i])) i++;
  let negative = false;
  if (s[i] === "+" || s[i] === "-") {
    negative = s[i] === "-";
    i++;
  }
  let radix: number = base === 0 ? 10 : base;
  if ((base === 0 || base === 16) && s[i] === "0" && (s[i + 1] === "x" || s[i + 1] === "X")) {
    // "0x" counts as hex only when a hex digit follows; otherwise the "0" alone is the number.
    if (/[0-9a-fA-F]/.test(s[i + 2] ?? "")) {
      radix = 16;
      i += 2;
    }
  } else if (base === 0 && s[i] === "0") {
    radix = 8;
  }
  const start = i;
  let value = 0n;
  const big = BigInt(radix);
  for (; i < s.length; i++) {
    const d = Number.parseInt(s[i] ?? "", radix);
    if (Number.isNaN(d)) break;
    value = value * big + BigInt(d);
  }
  if (i === start) return undefined;
  return { negative, value, end: i };
}

/** `qemu_strtoi64(s, NULL, 0)`: the whole string must be a base-0 integer in the int64 range. */
export function parseInt64(s: string): number | undefined {
  const r = scanInteger(s, 0);
  if (r === undefined || r.end !== s.length) return undefined;
  const v = r.negative ? -r.value : r.value;
  if (v < -TWO_63 || v >= TWO_63) return undefined;
  return Number(v);
}

/**
 * `qemu_strtou64(s, NULL, 0)`: like {@link parseInt64} but unsigned; a minus sign wraps modulo 2^64 as C's
 * `strtoull` does (`-1` is 2^64 − 1).
 */
export function parseUint64(s: string): number | undefined {
  const r = scanInteger(s, 0);
  if (r === undefined || r.end !== s.length || r.value >= TWO_64) return undefined;
  return Number(r.negative && r.value !== 0n ? TWO_64 - r.value : r.value);
}

const SIZE_SUFFIX: Readonly<Record<string, bigint>> = {
  b: 1n,
  B: 1n,
  k: 1n << 10n,
  K: 1n << 10n,
  m: 1n << 20n,
  M: 1n << 20n,
  g: 1n << 30n,
  G: 1n << 30n,
  t: 1n << 40n,
  T: 1n << 40n,
  p: 1n << 50n,
  P: 1n << 50n,
  e: 1n << 60n,
  E: 1n << 60n,
};

/**
 * `qemu_strtosz(s, NULL, …)`: a byte count with an optional binary suffix `B`, `k`, `M`, `G`, `T`, `P`, `E`
 * (case-insensitive; 1k = 1024). A fraction needs a suffix other than `B` (`1.5k` = 1536, rounded half up);
 * hex (`0x200`) takes no fraction; negative numbers and values of 2^64 or more are refused.
 */
export function parseSize(s: string): number | undefined {
  const r = scanInteger(s, 10);
  if (r === undefined) return undefined;
  if (s.slice(0, r.end).includes("-")) return undefined;
  let val = r.value;
  let end = r.end;
  let fraction = 0n; // 64-bit fixed-point fraction
  if (val === 0n && (s[end] === "x" || s[end] === "X")) {
    const h = scanInteger(s, 16);
    if (h === undefined) return undefined;
    val = h.value;
    end = h.end;
    if (val >= TWO_64 || s[end] === ".") return undefined;
  } else if (s[end] === ".") {
    const m = /^\.(\d+)([eE][+-]?\d+)?/.exec(s.slice(end));
    if (m === null) {
      end++; // "1.k": a bare dot
    } else {
      if (m[2] !== undefined) return undefined; // no exponents
      const f = Number(`0.${m[1] ?? "0"}`);
      fraction = BigInt(Math.min(Math.trunc(f * 2 ** 64), 2 ** 64 - 2048));
      end += m[0].length;
    }
  }
  if (val >= TWO_64) return undefined;
  let mul = 1n;
  const suffix = SIZE_SUFFIX[s[end] ?? ""];
  if (suffix !== undefined) {
    mul = suffix;
    end++;
  }
  if (end !== s.length) return undefined;
  if (mul === 1n) {
    if (fraction !== 0n) return undefined;
    return Number(val);
  }
  const fracProduct = fraction * mul;
  let result = val * mul + (fracProduct >> 64n);
  result += ((fracProduct & (TWO_64 - 1n)) >> 63n) & 1n; // round 0.5 up
  if (result >= TWO_64) return undefined;
  return Number(result);
}

const DECIMAL_FLOAT = /^[ \t\n\v\f\r]*[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$/;

/** `qemu_strtod_finite(s, NULL)` for decimal input: a finite double, the whole string consumed. */
export function parseNumber(s: string): number | undefined {
  if (!DECIMAL_FLOAT.test(s)) return undefined;
  const v = Number(s.trim());
  return Number.isFinite(v) ? v : undefined;
}

/** `qapi_bool_parse`: on/yes/true/y and off/no/false/n, case-sensitive. */
export function parseBool(s: string): boolean | undefined {
  switch (s) {
    case "on":
    case "yes":
    case "true":
    case "y":
      return true;
    case "off":
    case "no":
    case "false":
    case "n":
      return false;
    default:
      return undefined;
  }
}
