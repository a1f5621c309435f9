/**
 * The URI splitter QEMU 7.2 uses for gluster filenames (util/uri.c, an RFC 3986 reference parser), written
 * from the behaviour described in /work/shared/spec/gluster-url.md §2 and checked against qemu-img 7.2.22.
 *
 * What matters for gluster, and where it differs from WHATWG `URL`:
 * - a URI reference is tried as `scheme ":" hier-part` first and, failing that, as a relative reference
 *   (so a string without a scheme parses too);
 * - the authority host is either `[` anything-but-`]` `]` (no validation at all, brackets kept) or a
 *   reg-name (unreserved, sub-delims, valid `%XX`). QEMU's IPv4 branch never matches (it forgets to step over
 *   the second dot), so dotted quads are read as reg-names;
 * - the port is 1*DIGIT and at most 65535, checked digit by digit; 0 means "no port";
 * - the host and the path are percent-decoded by the splitter, the query is kept raw;
 * - userinfo and the fragment are accepted and dropped; the fragment may also contain `[` and `]`.
 *
 * @module
 */

const ALPHA = 1;
const DIGIT = 2;
const HEX = 4;
const UNRESERVED = 8;
const SUB_DELIM = 16;

/** Character classes of the ASCII range (everything else is in no class). */
const CLASS: Uint8Array = (() => {
  const t = new Uint8Array(128);
  const set = (chars: string, bits: number): void => {
    for (let i = 0; i < chars.length; i++) {
      const c = chars.charCodeAt(i);
      t[c] = (t[c] ?? 0) | bits;
    }
  };
  const lower = "abcdefghijklmnopqrstuvwxyz";
  const upper = lower.toUpperCase();
  set(lower + upper, ALPHA | UNRESERVED);
  set("0123456789", DIGIT | HEX | UNRESERVED);
  set("abcdefABCDEF", HEX);
  set("-._~", UNRESERVED);
  set("!$&'()*+,;=", SUB_DELIM);
  return t;
})();

const cls = (s: string, i: number): number => {
  const c = s.charCodeAt(i); // NaN past the end: no class
  return c < 128 ? (CLASS[c] ?? 0) : 0;
};

const isPct = (s: string, i: number): boolean =>
  s.charCodeAt(i) === 0x25 && (cls(s, i + 1) & HEX) !== 0 && (cls(s, i + 2) & HEX) !== 0;

/** pchar = unreserved / pct-encoded / sub-delims / ":" / "@" */
const isPchar = (s: string, i: number): boolean => {
  if ((cls(s, i) & (UNRESERVED | SUB_DELIM)) !== 0) return true;
  const c = s.charCodeAt(i);
  return c === 0x3a || c === 0x40 || isPct(s, i);
};

/** Steps over one character, or over a whole `%XX` escape. */
const step = (s: string, i: number): number => (s.charCodeAt(i) === 0x25 ? i + 3 : i + 1);

/** The pieces of a split URI that the gluster parser uses. Host and path are raw (still percent-encoded). */
interface SplitUri {
  scheme: string | undefined;
  host: string | undefined;
  /** 0 when the URI has no port or an explicit `:0`. */
  port: number;
  path: string | undefined;
  query: string | undefined;
}

/** segment (`allowEmpty`) or segment-nz; `forbid` stops the segment early (segment-nz-nc). -1 on failure. */
function segment(s: string, i: number, allowEmpty: boolean, forbid = -1): number {
  if (!isPchar(s, i)) return allowEmpty ? i : -1;
  while (isPchar(s, i) && s.charCodeAt(i) !== forbid) i = step(s, i);
  return i;
}

/** Repeats `"/" segment` from `i`. */
function moreSegments(s: string, i: number): number {
  while (s.charCodeAt(i) === 0x2f) i = segment(s, i + 1, true);
  return i;
}

/** authority = [ userinfo "@" ] host [ ":" port ]; fills `uri.host`/`uri.port`. -1 on failure. */
function authority(s: string, i: number, uri: SplitUri): number {
  let j = i;
  while ((cls(s, j) & (UNRESERVED | SUB_DELIM)) !== 0 || s.charCodeAt(j) === 0x3a || isPct(s, j))
    j = step(s, j);
  if (s.charCodeAt(j) === 0x40) i = j + 1;
  const start = i;
  if (s.charCodeAt(i) === 0x5b) {
    const close = s.indexOf("]", i + 1);
    if (close < 0) return -1;
    i = close + 1;
  } else {
    while ((cls(s, i) & (UNRESERVED | SUB_DELIM)) !== 0 || isPct(s, i)) i = step(s, i);
  }
  uri.host = i > start ? s.slice(start, i) : undefined;
  if (s.charCodeAt(i) === 0x3a) {
    i++;
    if ((cls(s, i) & DIGIT) === 0) return -1;
    let port = 0;
    while ((cls(s, i) & DIGIT) !== 0) {
      port = port * 10 + (s.charCodeAt(i) - 0x30);
      if (port > 65535) return -1;
      i++;
    }
    uri.port = port;
  }
  return i;
}

/** `[ "?" query ] [ "#" fragment ]` then end of input. False when characters are left over. */
function tail(s: string, i: number, uri: SplitUri): boolean {
  if (s.charCodeAt(i) === 0x3f) {
    const start = ++i;
    while (isPchar(s, i) || s.charCodeAt(i) === 0x2f || s.charCodeAt(i) === 0x3f) i = step(s, i);
    uri.query = s.slice(start, i);
  }
  if (s.charCodeAt(i) === 0x23) {
    i++;
    for (;;) {
      const ch = s.charCodeAt(i);
      if (isPchar(s, i) || ch === 0x2f || ch === 0x3f || ch === 0x5b || ch === 0x5d) i = step(s, i);
      else break;
    }
  }
  return i === s.length;
}

const empty = (): SplitUri => ({
  scheme: undefined,
  host: undefined,
  port: 0,
  path: undefined,
  query: undefined,
});

/** `scheme ":" hier-part [ "?" query ] [ "#" fragment ]` */
function absolute(s: string): SplitUri | undefined {
  if ((cls(s, 0) & ALPHA) === 0) return undefined;
  let i = 1;
  while ((cls(s, i) & (ALPHA | DIGIT)) !== 0 || s[i] === "+" || s[i] === "-" || s[i] === ".") i++;
  if (s.charCodeAt(i) !== 0x3a) return undefined;
  const uri = empty();
  uri.scheme = s.slice(0, i);
  i++;
  const start = i;
  if (s.startsWith("//", i)) {
    i = authority(s, i + 2, uri);
    if (i < 0) return undefined;
    const p = i;
    i = moreSegments(s, i);
    uri.path = i > p ? s.slice(p, i) : undefined;
  } else if (s.charCodeAt(i) === 0x2f) {
    const j = segment(s, i + 1, false);
    i = j < 0 ? i + 1 : moreSegments(s, j);
    uri.path = s.slice(start, i);
  } else if (isPchar(s, i)) {
    i = moreSegments(s, segment(s, i, false));
    uri.path = s.slice(start, i);
  }
  return tail(s, i, uri) ? uri : undefined;
}

/** relative-ref = relative-part [ "?" query ] [ "#" fragment ] */
function relative(s: string): SplitUri | undefined {
  const uri = empty();
  let i = 0;
  if (s.startsWith("//")) {
    i = authority(s, 2, uri);
    if (i < 0) return undefined;
    const p = i;
    i = moreSegments(s, i);
    uri.path = i > p ? s.slice(p, i) : undefined;
  } else if (s.charCodeAt(0) === 0x2f) {
    const j = segment(s, 1, false);
    i = j < 0 ? 1 : moreSegments(s, j);
    uri.path = s.slice(0, i);
  } else if (isPchar(s, 0)) {
    i = moreSegments(s, segment(s, 0, false, 0x3a));
    uri.path = i > 0 ? s.slice(0, i) : undefined;
  }
  return tail(s, i, uri) ? uri : undefined;
}

/**
 * Splits `s` as QEMU's `uri_parse` does: as an absolute URI, else as a relative reference.
 * Returns `undefined` where QEMU's parser fails. The input must not contain NUL.
 */
export function splitUri(s: string): SplitUri | undefined {
  return absolute(s) ?? relative(s);
}

const utf8 = new TextDecoder("utf-8", { fatal: true });
const encoder = new TextEncoder();

/**
 * Percent-decodes `raw` the way QEMU does (`%XX` with two hex digits; anything else literally), then reads the
 * bytes as a C string: everything from the first NUL byte on is dropped. Returns `undefined` when the decoded
 * bytes are not UTF-8 (QEMU would pass the raw bytes on; a JS string cannot hold them faithfully).
 */
export function pctDecode(raw: string): string | undefined {
  if (!raw.includes("%")) return raw;
  const src = encoder.encode(raw);
  const out = new Uint8Array(src.length);
  let n = 0;
  for (let i = 0; i < src.length; ) {
    const b = src[i] as number;
    if (b === 0x25 && i + 2 < src.length) {
      const hi = hexValue(src[i + 1] as number);
      const lo = hexValue(src[i + 2] as number);
      if (hi >= 0 && lo >= 0) {
        const v = hi * 16 + lo;
        if (v === 0) break; // C string: the value ends here
        out[n++] = v;
        i += 3;
        continue;
      }
    }
    out[n++] = b;
    i++;
  }
  try {
    return utf8.decode(out.subarray(0, n));
  } catch {
    return undefined;
  }
}

function hexValue(b: number): number {
  if (b >= 0x30 && b <= 0x39) return b - 0x30;
  if (b >= 0x61 && b <= 0x66) return b - 0x57;
  if (b >= 0x41 && b <= 0x46) return b - 0x37;
  return -1;
}

/** One `name[=value]` of a query; both raw (still percent-encoded). `value` is null for a bare `name`. */
interface RawQueryParam {
  name: string;
  value: string | null;
}

/**
 * Splits a raw query as QEMU's `query_params_parse` does: sections end at `&`, or, when no `&` is left in the
 * rest of the query, at `;`; empty sections and `=value` sections are dropped; a section that is exactly `=`
 * becomes a parameter whose name is the whole rest of the query (a QEMU quirk).
 */
export function splitQuery(query: string | undefined): RawQueryParam[] {
  const params: RawQueryParam[] = [];
  if (query === undefined) return params;
  // Next occurrence of a character at or after `pos`, remembered so that long queries stay linear.
  const cache = new Map<string, number>();
  const next = (ch: string, pos: number): number => {
    const known = cache.get(ch);
    if (known !== undefined && (known < 0 || known >= pos)) return known;
    const found = query.indexOf(ch, pos);
    cache.set(ch, found);
    return found;
  };
  let pos = 0;
  while (pos < query.length) {
    const amp = next("&", pos);
    const semi = amp < 0 ? next(";", pos) : -1;
    const end = amp >= 0 ? amp : semi >= 0 ? semi : query.length;
    let eq = next("=", pos);
    if (eq >= end) eq = -1;
    if (end === pos) {
      // empty section
    } else if (eq < 0) {
      params.push({ name: query.slice(pos, end), value: null });
    } else if (eq + 1 === end) {
      params.push({ name: eq === pos ? query.slice(pos) : query.slice(pos, eq), value: "" });
    } else if (eq !== pos) {
      params.push({ name: query.slice(pos, eq), value: query.slice(eq + 1, end) });
    }
    pos = end < query.length ? end + 1 : end;
  }
  return params;
}
