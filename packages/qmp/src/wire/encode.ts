/**
 * QMP output encoding as QEMU 7.2 writes it (`qobject/qjson.c` behaviour, shared/spec/qmp.md §1.1, observed
 * on qemu-storage-daemon 7.2.22): `", "` and `": "` separators, ASCII only (everything else as uppercase
 * `\uXXXX`, astral characters as surrogate pairs), DEL escaped, `/` and `'` left alone, doubles as C's
 * `%.17g`. Member order is the insertion order of the JS object.
 */

const HEX = "0123456789ABCDEF";

function escapeString(s: string): string {
  let out = '"';
  let run = 0;
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c >= 0x20 && c < 0x7f && c !== 0x22 && c !== 0x5c) continue;
    out += s.slice(run, i);
    run = i + 1;
    switch (c) {
      case 0x22:
        out += '\\"';
        break;
      case 0x5c:
        out += "\\\\";
        break;
      case 0x08:
        out += "\\b";
        break;
      case 0x0c:
        out += "\\f";
        break;
      case 0x0a:
        out += "\\n";
        break;
      case 0x0d:
        out += "\\r";
        break;
      case 0x09:
        out += "\\t";
        break;
      default: {
        let u = c;
        if (c >= 0xd800 && c <= 0xdbff) {
          const next = s.charCodeAt(i + 1);
          if (next >= 0xdc00 && next <= 0xdfff) {
            out += `\\u${hex4(c)}\\u${hex4(next)}`;
            i++;
            run = i + 1;
            continue;
          }
          u = 0xfffd;
        } else if (c >= 0xdc00 && c <= 0xdfff) u = 0xfffd;
        out += `\\u${hex4(u)}`;
      }
    }
  }
  return `${out}${s.slice(run)}"`;
}

function hex4(c: number): string {
  return (HEX[(c >> 12) & 15] as string) + HEX[(c >> 8) & 15] + HEX[(c >> 4) & 15] + HEX[c & 15];
}

/**
 * A double as C's `printf("%.17g")` prints it (QEMU's number output): 17 significant digits, trailing
 * zeros dropped, exponent form when the exponent is below -4 or at least 17. Non-finite values come out as
 * `inf`, `-inf` and `nan`, as QEMU writes them (not valid JSON).
 */
export function formatDouble(d: number): string {
  if (Number.isNaN(d)) return "nan";
  if (!Number.isFinite(d)) return d > 0 ? "inf" : "-inf";
  if (d === 0) return Object.is(d, -0) ? "-0" : "0";
  const [mant = "", expText = "0"] = d.toExponential(16).split("e");
  const exp = Number(expText);
  if (exp < -4 || exp >= 17) {
    const m = mant.includes(".") ? mant.replace(/0+$/, "").replace(/\.$/, "") : mant;
    return `${m}e${exp < 0 ? "-" : "+"}${String(Math.abs(exp)).padStart(2, "0")}`;
  }
  const fixed = d.toFixed(16 - exp);
  return fixed.includes(".") ? fixed.replace(/0+$/, "").replace(/\.$/, "") : fixed;
}

function encodeNumber(d: number): string {
  // Integers below 1e17 print the same under %.17g and as QEMU's integers.
  if (Number.isInteger(d) && Math.abs(d) < 1e17 && !Object.is(d, -0)) return String(d);
  return formatDouble(d);
}

function encode(v: unknown, depth: number): string | undefined {
  if (depth > 2100) throw new RangeError("QMP value nested too deeply to encode");
  switch (typeof v) {
    case "string":
      return escapeString(v);
    case "number":
      return encodeNumber(v);
    case "bigint":
      return v.toString();
    case "boolean":
      return v ? "true" : "false";
    case "undefined":
    case "function":
    case "symbol":
      return undefined;
    case "object":
      break;
  }
  if (v === null) return "null";
  const obj = v as { toJSON?: unknown };
  if (typeof obj.toJSON === "function") return encode((obj.toJSON as () => unknown).call(v), depth + 1);
  if (Array.isArray(v)) {
    if (v.length === 0) return "[]";
    const items: string[] = [];
    for (const item of v as unknown[]) items.push(encode(item, depth + 1) ?? "null");
    return `[${items.join(", ")}]`;
  }
  const members: string[] = [];
  for (const key of Object.keys(v as object)) {
    const text = encode((v as Record<string, unknown>)[key], depth + 1);
    if (text !== undefined) members.push(`${escapeString(key)}: ${text}`);
  }
  return members.length === 0 ? "{}" : `{${members.join(", ")}}`;
}

/**
 * Encodes a value the way QEMU writes QMP output (without the line terminator). `undefined` members are
 * left out, objects with `toJSON()` (such as `QmpError`) are encoded through it, `bigint` is an integer.
 * @example
 * encodeQmpJson({ return: {}, id: 1 }) // '{"return": {}, "id": 1}'
 */
export function encodeQmpJson(value: unknown): string {
  return encode(value, 0) ?? "null";
}
