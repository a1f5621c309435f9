/**
 * QMP's streaming JSON reader, written for the rules of QEMU 7.2's JSON lexer, streamer and parser
 * (`qobject/json-lexer.c`, `json-streamer.c`, `json-parser.c`; behaviour described in shared/spec/qmp.md §1.1
 * and observed on qemu-storage-daemon 7.2.22, see test/fixtures/qsd-hostile.ts).
 *
 * Three stages, as in QEMU, because the error a client sees depends on them:
 * 1. a byte lexer (explicit state machine): strings in double **or single** quotes, numbers, lowercase
 *    keywords and structural characters; a lexical error yields one "stray" token and then skips input until
 *    a resynchronisation byte (an ASCII control character other than TAB, 0xFE, 0xFF, or one of `[]{},:`);
 * 2. a streamer that collects tokens until braces and brackets balance (no delimiter is needed between
 *    messages), enforcing size, token-count and nesting limits *before* storing anything;
 * 3. a parser over the collected tokens that builds the value or gives QEMU's `JSON parse error, …` text.
 *
 * The reader never gives up: after an error it recovers exactly as QEMU does, so one bad message costs the
 * client one error answer and never the session.
 */

/** A JSON value as read from the QMP wire. Integers beyond ±2^53 that fit 64 bits arrive as `bigint`. */
export type QmpJsonValue = null | boolean | number | bigint | string | QmpJsonValue[] | QmpJsonObject;

/** A JSON object as read from the QMP wire. */
export interface QmpJsonObject {
  [key: string]: QmpJsonValue;
}

/** One complete message from the reader: a value, or QEMU's error text for input that was not one. */
export type QmpJsonMessage =
  | { readonly ok: true; readonly value: QmpJsonValue }
  | { readonly ok: false; readonly error: string };

/** Limits of {@link QmpJsonReader}; the defaults are QEMU's. */
export interface QmpJsonLimits {
  /** Bytes of tokens in one message (QEMU: 64 MiB). Exceeding it: `JSON token size limit exceeded`. */
  maxMessageBytes?: number;
  /** Tokens in one message (QEMU: 2 Mi). Exceeding it: `JSON token count limit exceeded`. */
  maxTokens?: number;
  /** Open braces plus brackets (QEMU: 1024; at most 2048). Exceeding it: `JSON nesting depth limit exceeded`. */
  maxDepth?: number;
}

/** Deepest nesting the reader accepts whatever `maxDepth` says (the parser recurses per level). */
const MAX_SUPPORTED_DEPTH = 2048;

/** QEMU's limits: 64 MiB of tokens per message, 2 Mi tokens, nesting depth 1024. */
export const QMP_JSON_DEFAULT_LIMITS: Readonly<Required<QmpJsonLimits>> = Object.freeze({
  maxMessageBytes: 64 * 1024 * 1024,
  maxTokens: 2 * 1024 * 1024,
  maxDepth: 1024,
});

// Lexer states.
const S_START = 0;
const S_KEYWORD = 1;
const S_STRING = 2; // quote char kept in `quote`
const S_STRING_ESC = 3;
const S_NEG = 4;
const S_ZERO = 5;
const S_NONZERO = 6;
const S_MANT = 7;
const S_MANT_DIGITS = 8;
const S_EXP_E = 9;
const S_EXP_SIGN = 10;
const S_EXP_DIGITS = 11;
const S_RECOVERY = 12;

// Token types.
const T_LCURLY = 0;
const T_RCURLY = 1;
const T_LSQUARE = 2;
const T_RSQUARE = 3;
const T_COMMA = 4;
const T_COLON = 5;
const T_STRING = 6;
const T_INTEGER = 7;
const T_FLOAT = 8;
const T_KEYWORD = 9;
const T_ERROR = 10;
const T_OVERSIZE = 11;

const STRUCTURAL: Record<number, number> = {
  123: T_LCURLY,
  125: T_RCURLY,
  91: T_LSQUARE,
  93: T_RSQUARE,
  44: T_COMMA,
  58: T_COLON,
};

const isDigit = (c: number): boolean => c >= 0x30 && c <= 0x39;
/** Bytes that end error recovery: control characters but TAB, 0xFE, 0xFF, and `[ ] { } , :`. */
const isSync = (c: number): boolean => (c < 0x20 && c !== 0x09) || c >= 0xfe || STRUCTURAL[c] !== undefined;

const utf8 = new TextDecoder("utf-8", { fatal: false });

/** Thrown inside the parser to carry the first error; never escapes this module. */
class ParseError extends Error {
  detail = "";
}
/** One preallocated instance: parsing is synchronous, and building a stack per bad message is wasted work. */
const PARSE_ERROR = new ParseError("QMP JSON parse error");
function fail(detail: string): never {
  PARSE_ERROR.detail = detail;
  throw PARSE_ERROR;
}

/**
 * Incremental reader of the QMP input stream: feed it bytes as they arrive, in any split, and it hands out
 * one {@link QmpJsonMessage} per top-level value or error, exactly where QEMU would.
 * @example
 * const reader = new QmpJsonReader();
 * reader.push(Buffer.from("{'execute': 'query-version'}{\"execute\""), (m) => console.log(m));
 */
export class QmpJsonReader {
  readonly #maxBytes: number;
  readonly #maxTokens: number;
  readonly #maxDepth: number;
  // lexer
  #state = S_START;
  #quote = 0;
  #tok: Uint8Array = new Uint8Array(256);
  #tokLen = 0;
  // streamer
  #types: number[] = [];
  #values: (string | Uint8Array | undefined)[] = [];
  #tokenBytes = 0;
  #braces = 0;
  #brackets = 0;
  // one push() at a time
  #emit: ((m: QmpJsonMessage) => boolean | undefined) | undefined;
  #stop = false;

  constructor(limits: QmpJsonLimits = {}) {
    this.#maxBytes = limits.maxMessageBytes ?? QMP_JSON_DEFAULT_LIMITS.maxMessageBytes;
    this.#maxTokens = limits.maxTokens ?? QMP_JSON_DEFAULT_LIMITS.maxTokens;
    // The parser recurses once per level: keep it far from the JS stack limit.
    this.#maxDepth = Math.min(limits.maxDepth ?? QMP_JSON_DEFAULT_LIMITS.maxDepth, MAX_SUPPORTED_DEPTH);
  }

  /** Bytes held for an unfinished message (the token being lexed plus the collected tokens). */
  get bufferedBytes(): number {
    return this.#tokLen + this.#tokenBytes;
  }

  /**
   * Feeds `chunk` from byte `start`. Calls `onMessage` for every message completed; when `onMessage` returns
   * `false` the reader stops right after that message. Returns the index of the first byte not consumed
   * (`chunk.length` when all was consumed).
   */
  push(chunk: Uint8Array, onMessage: (m: QmpJsonMessage) => boolean | undefined, start = 0): number {
    this.#emit = onMessage;
    this.#stop = false;
    let i = start;
    const n = chunk.length;
    const stopped = (): boolean => this.#stop; // set by the onMessage callback
    try {
      while (i < n && !stopped()) {
        if (this.#state === S_STRING) {
          // Fast path: copy a run of ordinary string bytes at once (same result as byte by byte).
          const j = this.#stringRun(chunk, i, n);
          if (j > i) {
            i = j;
            continue;
          }
        }
        const c = chunk[i] as number;
        if (this.#step(c)) i++;
      }
    } finally {
      this.#emit = undefined;
    }
    return i;
  }

  /** Convenience for tests and tools: feeds the whole chunk and returns the messages it completed. */
  pushAll(chunk: Uint8Array): QmpJsonMessage[] {
    const out: QmpJsonMessage[] = [];
    this.push(chunk, (m) => {
      out.push(m);
      return true;
    });
    return out;
  }

  /** Forgets any partial input (lexer and streamer back to their initial state). */
  reset(): void {
    this.#state = S_START;
    this.#tokLen = 0;
    this.#resetStreamer();
    if (this.#tok.length > 4096) this.#tok = new Uint8Array(256);
  }

  /** Processes one byte; returns false when the byte must be looked at again (lookahead). */
  #step(c: number): boolean {
    switch (this.#state) {
      case S_START: {
        if (c === 0x20 || c === 0x09 || c === 0x0a || c === 0x0d) return true;
        const s = STRUCTURAL[c];
        if (s !== undefined) {
          this.#append(c);
          this.#token(s);
          return true;
        }
        this.#append(c);
        if (c === 0x22 || c === 0x27) {
          this.#quote = c;
          this.#state = S_STRING;
        } else if (c === 0x30) this.#state = S_ZERO;
        else if (c >= 0x31 && c <= 0x39) this.#state = S_NONZERO;
        else if (c === 0x2d) this.#state = S_NEG;
        else if (c >= 0x61 && c <= 0x7a) this.#state = S_KEYWORD;
        else this.#error();
        return this.#checkTokenSize();
      }
      case S_KEYWORD:
        if (c >= 0x61 && c <= 0x7a) return this.#more(c);
        return this.#terminal(T_KEYWORD);
      case S_STRING:
        if (c === this.#quote) {
          this.#append(c);
          this.#token(T_STRING);
          return true;
        }
        if (c === 0x5c) {
          this.#state = S_STRING_ESC;
          return this.#more(c);
        }
        if (c >= 0x20 && c <= 0xfd) return this.#more(c);
        this.#append(c);
        this.#error();
        return true;
      case S_STRING_ESC:
        if (c >= 0x20 && c <= 0xfd) {
          this.#state = S_STRING;
          return this.#more(c);
        }
        this.#append(c);
        this.#error();
        return true;
      case S_NEG:
        if (c === 0x30) this.#state = S_ZERO;
        else if (c >= 0x31 && c <= 0x39) this.#state = S_NONZERO;
        else {
          this.#append(c);
          this.#error();
          return true;
        }
        return this.#more(c);
      case S_ZERO:
        if (c === 0x2e) {
          this.#state = S_MANT;
          return this.#more(c);
        }
        if (isDigit(c)) {
          this.#append(c);
          this.#error();
          return true;
        }
        return this.#terminal(T_INTEGER);
      case S_NONZERO:
        if (isDigit(c)) return this.#more(c);
        if (c === 0x2e) {
          this.#state = S_MANT;
          return this.#more(c);
        }
        if (c === 0x65 || c === 0x45) {
          this.#state = S_EXP_E;
          return this.#more(c);
        }
        return this.#terminal(T_INTEGER);
      case S_MANT:
        if (isDigit(c)) {
          this.#state = S_MANT_DIGITS;
          return this.#more(c);
        }
        this.#append(c);
        this.#error();
        return true;
      case S_MANT_DIGITS:
        if (isDigit(c)) return this.#more(c);
        if (c === 0x65 || c === 0x45) {
          this.#state = S_EXP_E;
          return this.#more(c);
        }
        return this.#terminal(T_FLOAT);
      case S_EXP_E:
        if (c === 0x2b || c === 0x2d) {
          this.#state = S_EXP_SIGN;
          return this.#more(c);
        }
        if (isDigit(c)) {
          this.#state = S_EXP_DIGITS;
          return this.#more(c);
        }
        this.#append(c);
        this.#error();
        return true;
      case S_EXP_SIGN:
        if (isDigit(c)) {
          this.#state = S_EXP_DIGITS;
          return this.#more(c);
        }
        this.#append(c);
        this.#error();
        return true;
      case S_EXP_DIGITS:
        if (isDigit(c)) return this.#more(c);
        return this.#terminal(T_FLOAT);
      default: // S_RECOVERY
        if (isSync(c)) {
          this.#state = S_START;
          return false;
        }
        return true;
    }
  }

  /**
   * Appends the ordinary string bytes from `i` (not the quote, a backslash, a control byte, 0xFE or 0xFF),
   * stopping where the byte-by-byte lexer would cut an oversized token. Returns the index after the run.
   */
  #stringRun(chunk: Uint8Array, i: number, n: number): number {
    const q = this.#quote;
    const limit = Math.min(n, i + (this.#maxBytes + 1 - this.#tokLen));
    let j = i;
    while (j < limit) {
      const c = chunk[j] as number;
      if (c === q || c === 0x5c || c < 0x20 || c > 0xfd) break;
      j++;
    }
    if (j === i) return i;
    const need = this.#tokLen + (j - i);
    if (need > this.#tok.length) {
      let size = this.#tok.length * 2;
      while (size < need) size *= 2;
      const bigger = new Uint8Array(size);
      bigger.set(this.#tok.subarray(0, this.#tokLen));
      this.#tok = bigger;
    }
    this.#tok.set(chunk.subarray(i, j), this.#tokLen);
    this.#tokLen = need;
    this.#checkTokenSize();
    return j;
  }

  #more(c: number): boolean {
    this.#append(c);
    return this.#checkTokenSize();
  }

  /** A token ended at the byte before `c`, which is then looked at again from the start state. */
  #terminal(type: number): boolean {
    this.#token(type);
    return false;
  }

  /** QEMU cuts a token that grows beyond the limit and hands it on, then lexes on from the start state. */
  #checkTokenSize(): boolean {
    if (this.#tokLen > this.#maxBytes) {
      this.#streamToken(T_OVERSIZE, this.#tokLen);
      this.#tokLen = 0;
      this.#state = S_START;
      if (this.#tok.length > 4096) this.#tok = new Uint8Array(256);
    }
    return true;
  }

  #append(c: number): void {
    if (this.#tokLen === this.#tok.length) {
      const bigger = new Uint8Array(this.#tok.length * 2);
      bigger.set(this.#tok);
      this.#tok = bigger;
    }
    this.#tok[this.#tokLen++] = c;
  }

  #error(): void {
    this.#token(T_ERROR);
    this.#state = S_RECOVERY;
  }

  #token(type: number): void {
    const len = this.#tokLen;
    this.#tokLen = 0;
    this.#state = S_START;
    this.#streamToken(type, len);
    if (this.#tok.length > 4096) this.#tok = new Uint8Array(256);
  }

  #resetStreamer(): void {
    this.#types = [];
    this.#values = [];
    this.#tokenBytes = 0;
    this.#braces = 0;
    this.#brackets = 0;
  }

  #deliver(m: QmpJsonMessage): void {
    this.#resetStreamer();
    if (this.#emit?.(m) === false) this.#stop = true;
  }

  /** The streamer: counts nesting, applies the limits, and parses once the message is complete. */
  #streamToken(type: number, len: number): void {
    switch (type) {
      case T_LCURLY:
        this.#braces++;
        break;
      case T_RCURLY:
        this.#braces--;
        break;
      case T_LSQUARE:
        this.#brackets++;
        break;
      case T_RSQUARE:
        this.#brackets--;
        break;
      case T_ERROR:
        this.#deliver({ ok: false, error: `JSON parse error, stray '${strayText(this.#tok, len)}'` });
        return;
      default:
        break;
    }
    if (this.#tokenBytes + len + 1 > this.#maxBytes) {
      this.#deliver({ ok: false, error: "JSON token size limit exceeded" });
      return;
    }
    if (this.#types.length + 1 > this.#maxTokens) {
      this.#deliver({ ok: false, error: "JSON token count limit exceeded" });
      return;
    }
    if (this.#braces + this.#brackets > this.#maxDepth) {
      this.#deliver({ ok: false, error: "JSON nesting depth limit exceeded" });
      return;
    }
    this.#types.push(type);
    if (type === T_STRING) this.#values.push(this.#tok.slice(0, len));
    else if (type === T_INTEGER || type === T_FLOAT || type === T_KEYWORD)
      this.#values.push(latin1(this.#tok, len));
    else this.#values.push(undefined);
    this.#tokenBytes += len;
    if ((this.#braces > 0 || this.#brackets > 0) && this.#braces >= 0 && this.#brackets >= 0) return;
    const parser = new TokenParser(this.#types, this.#values);
    let m: QmpJsonMessage;
    try {
      m = { ok: true, value: parser.parseValue() };
    } catch (e) {
      if (e !== PARSE_ERROR) throw e;
      m = { ok: false, error: `JSON parse error, ${PARSE_ERROR.detail}` };
    }
    this.#deliver(m);
  }
}

function latin1(bytes: Uint8Array, len: number): string {
  let s = "";
  for (let i = 0; i < len; i++) s += String.fromCharCode(bytes[i] as number);
  return s;
}

/** The offending token as QEMU prints it: a C string (cut at NUL), shown as UTF-8 with replacement. */
function strayText(bytes: Uint8Array, len: number): string {
  let end = 0;
  while (end < len && bytes[end] !== 0) end++;
  return utf8.decode(bytes.subarray(0, end));
}

/** Recursive-descent parser over one message's tokens, with QEMU's error texts; the first error wins. */
class TokenParser {
  readonly #types: readonly number[];
  readonly #values: readonly (string | Uint8Array | undefined)[];
  #pos = 0;
  constructor(types: readonly number[], values: readonly (string | Uint8Array | undefined)[]) {
    this.#types = types;
    this.#values = values;
  }

  parseValue(): QmpJsonValue {
    const i = this.#pos;
    const type = this.#types[i];
    if (type === undefined) fail("premature EOI");
    this.#pos++;
    switch (type) {
      case T_LCURLY:
        return this.#parseObject();
      case T_LSQUARE:
        return this.#parseArray();
      case T_STRING:
        return parseString(this.#values[i] as Uint8Array);
      case T_INTEGER:
        return parseInteger(this.#values[i] as string);
      case T_FLOAT:
        return Number(this.#values[i] as string);
      case T_KEYWORD: {
        const word = this.#values[i] as string;
        if (word === "true") return true;
        if (word === "false") return false;
        if (word === "null") return null;
        return fail(`invalid keyword '${word}'`);
      }
      default:
        return fail("expecting value");
    }
  }

  #next(): number {
    const t = this.#types[this.#pos];
    if (t === undefined) fail("premature EOI");
    this.#pos++;
    return t;
  }

  #parseObject(): QmpJsonObject {
    const obj: QmpJsonObject = {};
    if (this.#types[this.#pos] === T_RCURLY) {
      this.#pos++;
      return obj;
    }
    for (;;) {
      const key = this.parseValue();
      if (typeof key !== "string") fail("key is not a string in object");
      if (this.#next() !== T_COLON) fail("missing : in object pair");
      const value = this.parseValue();
      if (Object.hasOwn(obj, key)) fail("duplicate key");
      if (key === "__proto__")
        Object.defineProperty(obj, key, { value, enumerable: true, writable: true, configurable: true });
      else obj[key] = value;
      const sep = this.#next();
      if (sep === T_RCURLY) return obj;
      if (sep !== T_COMMA) fail("expected separator in dict");
    }
  }

  #parseArray(): QmpJsonValue[] {
    const arr: QmpJsonValue[] = [];
    if (this.#types[this.#pos] === T_RSQUARE) {
      this.#pos++;
      return arr;
    }
    for (;;) {
      arr.push(this.parseValue());
      const sep = this.#next();
      if (sep === T_RSQUARE) return arr;
      if (sep !== T_COMMA) fail("expected separator in list");
    }
  }
}

const INT64_MIN = -(2n ** 63n);
const UINT64_MAX = 2n ** 64n - 1n;

/** QEMU: int64 if it fits, else uint64, else a double. Exact JS numbers where possible, else bigint. */
function parseInteger(text: string): number | bigint {
  if (text.length < 16) return Number(text) + 0; // + 0 turns -0 into 0, as QEMU's integer
  const big = BigInt(text);
  if (big >= INT64_MIN && big <= UINT64_MAX) {
    return big >= BigInt(Number.MIN_SAFE_INTEGER) && big <= BigInt(Number.MAX_SAFE_INTEGER)
      ? Number(big)
      : big;
  }
  return Number(text);
}

/** QEMU accepts code points in Unicode's range that are neither surrogates nor noncharacters. */
function isValidCodePoint(cp: number): boolean {
  if (cp < 0 || cp > 0x10ffff) return false;
  if (cp >= 0xd800 && cp <= 0xdfff) return false;
  if (cp >= 0xfdd0 && cp <= 0xfdef) return false;
  return (cp & 0xfffe) !== 0xfffe;
}

function hex4(b: Uint8Array, at: number): number {
  let v = 0;
  for (let k = 0; k < 4; k++) {
    const c = at + k < b.length ? (b[at + k] as number) : 0;
    let d: number;
    if (c >= 0x30 && c <= 0x39) d = c - 0x30;
    else if (c >= 0x61 && c <= 0x66) d = c - 0x57;
    else if (c >= 0x41 && c <= 0x46) d = c - 0x37;
    else return -1;
    v = v * 16 + d;
  }
  return v;
}

/** Decodes one (modified) UTF-8 sequence at `at`; returns [codePoint, length] or [-1, 0]. */
function utf8At(b: Uint8Array, at: number, end: number): [number, number] {
  const c0 = b[at] as number;
  let need: number;
  let cp: number;
  let min: number;
  if (c0 < 0x80) return [c0, 1];
  if (c0 >= 0xc0 && c0 <= 0xdf) {
    need = 1;
    cp = c0 & 0x1f;
    min = 0x80;
  } else if (c0 >= 0xe0 && c0 <= 0xef) {
    need = 2;
    cp = c0 & 0x0f;
    min = 0x800;
  } else if (c0 >= 0xf0 && c0 <= 0xf7) {
    need = 3;
    cp = c0 & 0x07;
    min = 0x10000;
  } else return [-1, 0];
  for (let k = 1; k <= need; k++) {
    const c = at + k < end ? (b[at + k] as number) : 0;
    if ((c & 0xc0) !== 0x80) return [-1, 0];
    cp = (cp << 6) | (c & 0x3f);
  }
  if (cp < min) {
    // overlong; modified UTF-8 allows only C0 80 for NUL
    return need === 1 && cp === 0 ? [0, 2] : [-1, 0];
  }
  return isValidCodePoint(cp) ? [cp, need + 1] : [-1, 0];
}

/** A string token (with its quotes) to its value, with QEMU's escape rules and error texts. */
function parseString(b: Uint8Array): string {
  const end = b.length - 1; // closing quote
  const parts: string[] = [];
  let runStart = 1;
  let i = 1;
  const flush = (upTo: number): void => {
    if (upTo > runStart) parts.push(latin1Range(b, runStart, upTo));
  };
  while (i < end) {
    const c = b[i] as number;
    if (c === 0x5c) {
      flush(i);
      const beg = i;
      const e = b[i + 1] as number;
      i += 2;
      switch (e) {
        case 0x22:
          parts.push('"');
          break;
        case 0x27:
          parts.push("'");
          break;
        case 0x5c:
          parts.push("\\");
          break;
        case 0x2f:
          parts.push("/");
          break;
        case 0x62:
          parts.push("\b");
          break;
        case 0x66:
          parts.push("\f");
          break;
        case 0x6e:
          parts.push("\n");
          break;
        case 0x72:
          parts.push("\r");
          break;
        case 0x74:
          parts.push("\t");
          break;
        case 0x75: {
          let cp = hex4(b, i);
          i += 4;
          if (cp >= 0xd800 && cp <= 0xdbff && b[i] === 0x5c && b[i + 1] === 0x75) {
            const trailing = hex4(b, i + 2);
            if (trailing >= 0xdc00 && trailing <= 0xdfff) {
              cp = 0x10000 + ((cp & 0x3ff) << 10) + (trailing & 0x3ff);
              i += 6;
            } else cp = -1;
          }
          if (!isValidCodePoint(cp)) {
            fail(`${utf8.decode(b.subarray(beg, Math.min(i, b.length)))} is not a valid Unicode character`);
          }
          parts.push(String.fromCodePoint(cp));
          break;
        }
        default:
          fail("invalid escape sequence in string");
      }
      runStart = i;
    } else if (c < 0x80) {
      i++;
    } else {
      flush(i);
      const [cp, len] = utf8At(b, i, end);
      if (cp < 0) fail("invalid UTF-8 sequence in string");
      parts.push(String.fromCodePoint(cp));
      i += len;
      runStart = i;
    }
  }
  flush(Math.min(i, end));
  return parts.length === 1 ? (parts[0] as string) : parts.join("");
}

function latin1Range(b: Uint8Array, from: number, to: number): string {
  if (to - from > 64) return Buffer.from(b.buffer, b.byteOffset + from, to - from).toString("latin1");
  let s = "";
  for (let i = from; i < to; i++) s += String.fromCharCode(b[i] as number);
  return s;
}
