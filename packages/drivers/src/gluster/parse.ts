/**
 * Gluster filenames and options, parsed to QEMU 7.2's grammar and error texts
 * (/work/shared/spec/gluster-url.md; QEMU's block/gluster.c: `qemu_gluster_parse_uri`, `parse_volume_options`,
 * `qemu_gluster_parse_json`, `qemu_gluster_parse`, `qemu_gluster_glfs_init`).
 *
 * Stages, as QEMU runs them:
 * 1. the block layer maps the text before the first `:` to a protocol ({@link parseGlusterUri} only);
 * 2. `qemu_gluster_parse`: a `filename` goes to the URI parser, anything else to the JSON parser
 *    ({@link parseGlusterOptions} dispatches; {@link parseGlusterUri} and {@link validateGlusterOptions} are the
 *    two parsers);
 * 3. connect time (`qemu_gluster_glfs_init`): every inet port must be a decimal number up to 65535
 *    ({@link resolveGlusterConnection}). None of the parsers apply this check, exactly like QEMU.
 *
 * @module
 */

import { GLUSTER_JSON_USAGE, GlusterError, invalidUri } from "./errors.ts";
import {
  absorb,
  arrayEntries,
  extractSub,
  type FlatDict,
  flatten,
  parseOptionNumber,
  scalarString,
} from "./qdict.ts";
import { pctDecode, splitQuery, splitUri } from "./uri.ts";

/** An inet server (QAPI `InetSocketAddressBase`). `port` is a string, as in QEMU's structured form. */
export interface GlusterInetServer {
  type: "inet";
  host: string;
  /** Decimal port as text. The URI form always yields a number 1-65535; the JSON form keeps what it was given. */
  port: string;
}

/** A unix-socket server (QAPI `UnixSocketAddress`). */
export interface GlusterUnixServer {
  type: "unix";
  /** Path of glusterd's socket; may be empty or relative. */
  path: string;
}

/** One entry of `server` (QAPI `SocketAddress`, restricted to the two types gluster accepts). */
export type GlusterServer = GlusterInetServer | GlusterUnixServer;

/** QEMU's `BlockdevOptionsGluster`, without the `driver` key. */
export interface BlockdevOptionsGluster {
  /** Gluster volume name. */
  volume: string;
  /** Image path inside the volume, verbatim (no normalisation). */
  path: string;
  /** Volfile servers, tried in order. The URI form gives exactly one. */
  server: GlusterServer[];
  /** libgfapi log level 0-9, only when the options gave one ({@link parseGlusterOptions}). */
  debug?: number;
  /** libgfapi log file, only when the options gave one ({@link parseGlusterOptions}). */
  logfile?: string;
}

/** Options of the gluster parsers. */
export interface GlusterParseOptions {
  /**
   * Receives QEMU's warnings (`rdma feature is not supported, falling back to tcp` for `gluster+rdma`),
   * in the order QEMU prints them. Without it warnings are dropped; nothing is written to the console.
   */
  onWarning?: (message: string) => void;
}

/** The protocol names the gluster driver registers; the block layer matches them exactly. */
export const GLUSTER_PROTOCOLS: readonly string[] = [
  "gluster",
  "gluster+tcp",
  "gluster+unix",
  "gluster+rdma",
];

/** QEMU's `GLUSTER_DEFAULT_PORT`. */
export const GLUSTER_DEFAULT_PORT = 24007;

/** The warning QEMU prints for `gluster+rdma`. */
export const GLUSTER_RDMA_WARNING = "rdma feature is not supported, falling back to tcp";

/** Lone UTF-16 surrogates, which no C string (and so no QEMU filename) can hold. */
const LONE_SURROGATE = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/;

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/**
 * The block layer's protocol lookup: when a `:` comes before any `/`, the text before it (cut to 127 bytes,
 * QEMU's buffer) names the protocol, and it must be one of {@link GLUSTER_PROTOCOLS}.
 */
function checkProtocol(filename: string): void {
  const stop = filename.search(/[:/]/);
  if (stop < 0 || filename[stop] !== ":") return;
  let protocol = filename.slice(0, stop);
  if (GLUSTER_PROTOCOLS.includes(protocol)) return;
  const bytes = encoder.encode(protocol);
  if (bytes.length > 127) protocol = decoder.decode(bytes.subarray(0, 127));
  throw new GlusterError(`Unknown protocol '${protocol}'`);
}

/**
 * QEMU's `qemu_gluster_parse_uri`. Returns `undefined` where QEMU fails (the caller reports `invalid URI`).
 * Throws the message-less `Invalid argument` for `?socket` without a value (see {@link parseGlusterUri}).
 */
function parseUriCore(
  filename: string,
  onWarning: ((m: string) => void) | undefined,
): BlockdevOptionsGluster | undefined {
  if (filename.includes("\0") || LONE_SURROGATE.test(filename)) return undefined;
  const uri = splitUri(filename);
  if (uri === undefined) return undefined;

  let unix = false;
  switch (uri.scheme) {
    case undefined:
    case "gluster":
    case "gluster+tcp":
      break;
    case "gluster+unix":
      unix = true;
      break;
    case "gluster+rdma":
      onWarning?.(GLUSTER_RDMA_WARNING);
      break;
    default:
      return undefined;
  }

  // Volume and image path come from the decoded path: %2F separates in the volume position.
  if (uri.path === undefined) return undefined;
  const decoded = pctDecode(uri.path);
  if (decoded === undefined) return undefined;
  const volStart = skipSlashes(decoded, 0);
  const volEnd = decoded.indexOf("/", volStart);
  if (volEnd < 0) return undefined;
  const pathStart = skipSlashes(decoded, volEnd);
  if (pathStart === decoded.length) return undefined;
  const volume = decoded.slice(volStart, volEnd);
  const path = decoded.slice(pathStart);

  const params = splitQuery(uri.query);
  if (params.length > 1 || (unix && params.length === 0) || (!unix && params.length > 0)) return undefined;

  if (!unix) {
    let host = "localhost";
    if (uri.host !== undefined) {
      const h = pctDecode(uri.host);
      if (h === undefined) return undefined;
      host = h;
    }
    const port = String(uri.port === 0 ? GLUSTER_DEFAULT_PORT : uri.port);
    return { volume, path, server: [{ type: "inet", host, port }] };
  }

  if (uri.host !== undefined || uri.port !== 0) return undefined;
  const param = params[0];
  if (param === undefined || pctDecode(param.name) !== "socket") return undefined;
  if (param.value === null) {
    // QEMU accepts this and hands libgfapi a NULL socket path, which fails without a message.
    throw messageless(filename);
  }
  const socket = pctDecode(param.value);
  if (socket === undefined) return undefined;
  return { volume, path, server: [{ type: "unix", path: socket }] };
}

function skipSlashes(s: string, i: number): number {
  while (s.charCodeAt(i) === 0x2f) i++;
  return i;
}

/**
 * Parses a gluster URL as `qemu-img info '<uri>'` does in QEMU 7.2: protocol lookup, URI splitting and
 * percent-decoding (util/uri.c), transport from the scheme, volume/path split, query rules.
 *
 * - `gluster`, `gluster+tcp` and `gluster+rdma` give an inet server (host defaults to `localhost`, port to
 *   `24007`, `:0` means 24007, IPv6 brackets stay in the host); `gluster+rdma` first reports
 *   {@link GLUSTER_RDMA_WARNING} through `onWarning`, even when the URI then fails.
 * - `gluster+unix` needs exactly one query parameter `socket` and no host or port.
 * - A string with no protocol prefix (no `:` before the first `/`) is parsed as QEMU's gluster driver parses a
 *   scheme-less `filename` option: as inet. (qemu-img would hand such a string to the file driver.)
 *
 * Port validation beyond the URI grammar does not apply here (URI ports are always 0-65535); see
 * {@link resolveGlusterConnection}.
 *
 * Deviations, all failing with QEMU's `invalid URI` message: input containing NUL or lone surrogates, and
 * percent-escapes that decode to bytes which are not UTF-8 in the host, path or socket (QEMU passes such raw
 * bytes on). A decoded `%00` ends the value, as in QEMU (`a%00b.img` gives path `a`).
 *
 * @example
 * parseGlusterUri("gluster+tcp://[::1]:24009/testvol/dir/a.img");
 * // { volume: "testvol", path: "dir/a.img", server: [{ type: "inet", host: "[::1]", port: "24009" }] }
 * @throws {GlusterError} EINVAL `Unknown protocol '<scheme>'` when the prefix is not a gluster protocol.
 * @throws {GlusterError} EINVAL `invalid URI <uri>` (hint: {@link GLUSTER_URI_USAGE}) for every URI rejection.
 * @throws {GlusterError} EINVAL `Could not open '<uri>': Invalid argument` (no hint) for `gluster+unix` with a
 *   bare `?socket`: QEMU parses it but libgfapi then refuses the NULL socket path (QEMU's block layer words
 *   that error), and the JSON shape cannot carry a missing path.
 */
export function parseGlusterUri(uri: string, options: GlusterParseOptions = {}): BlockdevOptionsGluster {
  if (!uri.includes("\0")) checkProtocol(uri);
  const result = parseUriCore(uri, options.onWarning);
  if (result === undefined) throw invalidUri(uri);
  return result;
}

const JSON_OPTS = { volume: "string", path: "string", debug: "number" } as const;
const TYPE_OPTS = { type: "string" } as const;
const INET_OPTS = {
  type: "string",
  host: "string",
  port: "string",
  to: "number",
  ipv4: "bool",
  ipv6: "bool",
} as const;
const UNIX_OPTS = { socket: "string", path: "string" } as const;

/** `qemu_gluster_parse_json` on a flattened dictionary (consumed). Throws QEMU's errors with the JSON Usage hint. */
function parseJsonDict(dict: FlatDict): BlockdevOptionsGluster {
  const usage = GLUSTER_JSON_USAGE;
  const fail = (message: string, serverIndex?: number): GlusterError =>
    new GlusterError(message, serverIndex === undefined ? { usage } : { usage, serverIndex });

  const top = absorb(dict, JSON_OPTS, usage);
  const count = arrayEntries(dict, "server.");
  if (count < 1) throw fail("Parameter 'server' is missing");
  const volume = top.get("volume");
  if (volume === undefined) throw fail("Parameter 'volume' is missing");
  const path = top.get("path");
  if (path === undefined) throw fail("Parameter 'path' is missing");

  const server: GlusterServer[] = [];
  for (let i = 0; i < count; i++) {
    const sub = extractSub(dict, `server.${i}.`);
    let type = absorb(sub, TYPE_OPTS, usage).get("type");
    if (type === undefined) throw fail("Parameter 'type' is missing", i);
    if (type === "tcp") type = "inet";
    if (type === "inet") {
      const o = absorb(sub, INET_OPTS, usage);
      const host = o.get("host");
      if (host === undefined) throw fail("Parameter 'host' is missing", i);
      const port = o.get("port");
      if (port === undefined) throw fail("Parameter 'port' is missing", i);
      if (o.has("to")) throw fail("Parameter 'to' not supported");
      if (o.has("ipv4") || o.has("ipv6")) throw fail("Parameters 'ipv4/ipv6' not supported");
      server.push({ type: "inet", host, port });
    } else if (type === "unix") {
      const o = absorb(sub, UNIX_OPTS, usage);
      const p = o.get("path");
      if (p !== undefined && o.has("socket")) throw fail("Conflicting parameters 'path' and 'socket'", i);
      const socket = p ?? o.get("socket");
      if (socket === undefined) throw fail("Parameter 'path' is missing", i);
      server.push({ type: "unix", path: socket });
    } else {
      throw fail("Parameter 'type' may be 'inet' or 'unix'", i);
    }
  }
  return { volume, path, server };
}

/**
 * Validates the structured (JSON / `server[]`) form as QEMU 7.2's `qemu_gluster_parse_json` does and returns
 * it normalised: scalars become strings (numbers as QEMU prints them, booleans `on`/`off`), legacy
 * `type: "tcp"` becomes `inet`, the legacy unix key `socket` becomes `path`. `server` may be an array or an
 * object keyed `"0"`, `"1"`, …, and dotted keys (`server.0.host`, as `-drive` gives them) work too.
 *
 * Order of checks: `debug` type; `server` count (≥ 1 contiguous entries); `volume`; `path`; then each server
 * in order: `type`, then for inet the `to`/`ipv4`/`ipv6` value types, `host`, `port`, `to`, `ipv4`/`ipv6`; for
 * unix `path`/`socket`. There is no default port in this form, and the port is not range-checked here
 * (QEMU does that at connect time: {@link resolveGlusterConnection}). A `filename` key is ignored here; use
 * {@link parseGlusterOptions} for QEMU's URI-vs-JSON dispatch. `driver` and unknown keys are ignored.
 *
 * @example
 * validateGlusterOptions({ volume: "testvol", path: "a.img", server: [{ type: "unix", socket: "/tmp/g.sock" }] });
 * // { volume: "testvol", path: "a.img", server: [{ type: "unix", path: "/tmp/g.sock" }] }
 * @throws {GlusterError} EINVAL with QEMU's message (e.g. `Parameter 'port' is missing`), `serverIndex` and the
 *   `hint: check in 'server' array index 'N'` line where QEMU prints one, and the {@link GLUSTER_JSON_USAGE} hint.
 */
export function validateGlusterOptions(options: unknown): BlockdevOptionsGluster {
  const dict = flatten(options);
  if (dict === undefined) throw new GlusterError("Invalid JSON object given");
  return parseJsonDict(dict);
}

const OPEN_OPTS = { filename: "string", debug: "number", logfile: "string" } as const;

/** Picks the gluster node out of `json:` options: the top level, or a format driver's `file` child. */
function glusterNode(dict: FlatDict): FlatDict {
  if (scalarString(dict.get("driver")) === "gluster") return dict;
  if (scalarString(dict.get("file.driver")) === "gluster") return extractSub(dict, "file.");
  throw new GlusterError(
    "json: options name no gluster node (neither 'driver' nor 'file.driver' is 'gluster')",
  );
}

/**
 * QEMU's gluster open path (`qemu_gluster_open` → `qemu_gluster_parse`) on whatever names the image:
 *
 * - a string starting with `json:`: the JSON text, whose top level or `file` child (`"driver": "gluster"`)
 *   is then handled as below;
 * - any other string: {@link parseGlusterUri} (with the protocol lookup);
 * - an object: its `debug` (number, clamped to 0-9 as QEMU does) and `logfile` are taken first; then, if it has
 *   a `filename`, that is parsed as a URI and `volume`/`path`/`server` are ignored (errors: `invalid URI
 *   <filename>`; no protocol lookup, the driver is already chosen); otherwise {@link validateGlusterOptions}.
 *
 * The result carries `debug`/`logfile` only when they were given. Ports are not range-checked here
 * ({@link resolveGlusterConnection} does that, as QEMU's connect step).
 *
 * @example
 * parseGlusterOptions({ driver: "gluster", filename: "gluster://127.0.0.1:24016/testvol/a.img" });
 * // { volume: "testvol", path: "a.img", server: [{ type: "inet", host: "127.0.0.1", port: "24016" }] }
 * @throws {GlusterError} EINVAL with QEMU's message and hints: `Parameter 'debug' expects a number`,
 *   `Could not parse the JSON options: …` (the detail is JavaScript's, not QEMU's), `Invalid JSON object given`,
 *   and everything {@link parseGlusterUri} and {@link validateGlusterOptions} throw.
 */
export function parseGlusterOptions(
  input: string | Readonly<Record<string, unknown>>,
  options: GlusterParseOptions = {},
): BlockdevOptionsGluster {
  let dict: FlatDict | undefined;
  if (typeof input === "string") {
    if (!input.startsWith("json:")) return parseGlusterUri(input, options);
    let parsed: unknown;
    try {
      parsed = JSON.parse(input.slice(5));
    } catch (e) {
      throw new GlusterError(`Could not parse the JSON options: ${(e as Error).message}`, { cause: e });
    }
    dict = flatten(parsed);
    if (dict === undefined) throw new GlusterError("Invalid JSON object given");
    dict = glusterNode(dict);
  } else {
    dict = flatten(input);
    if (dict === undefined) throw new GlusterError("Invalid JSON object given");
  }

  const open = absorb(dict, OPEN_OPTS, undefined);
  const extra: { debug?: number; logfile?: string } = {};
  const debugText = open.get("debug");
  if (debugText !== undefined) {
    // QEMU stores the u64 in an int, then clamps to 0..GLUSTER_DEBUG_MAX.
    const level = Number(BigInt.asIntN(32, parseOptionNumber("debug", debugText, undefined)));
    extra.debug = Math.min(Math.max(level, 0), 9);
  }
  const logfile = open.get("logfile");
  if (logfile !== undefined) extra.logfile = logfile;

  const filename = open.get("filename");
  let result: BlockdevOptionsGluster;
  if (filename !== undefined) {
    const parsed = parseUriCore(filename, options.onWarning);
    if (parsed === undefined) throw invalidUri(filename);
    result = parsed;
  } else {
    result = parseJsonDict(dict);
  }
  return { ...result, ...extra };
}

const PORT_RE = /^[\t\n\v\f\r ]*\+?([0-9]+)$/;

/**
 * QEMU's connect-time port check (`parse_uint_full(port, 10)` then `<= 65535`): leading C whitespace and one
 * `+` are allowed, then decimal digits only (no `-`, no hex, nothing trailing).
 *
 * @example
 * parseGlusterPort(" +024007"); // 24007
 * @throws {GlusterError} EINVAL `'<port>' is not a valid port number` (no hint).
 */
export function parseGlusterPort(port: string): number {
  const m = PORT_RE.exec(port);
  const digits = m?.[1]?.replace(/^0+(?=.)/, "");
  if (digits === undefined || digits.length > 5 || Number(digits) > 65535) {
    throw new GlusterError(`'${port}' is not a valid port number`);
  }
  return Number(digits);
}

/** A server as libgfapi receives it: an inet port as a number. */
export type GlusterVolfileServer =
  | { type: "inet"; host: string; port: number }
  | { type: "unix"; path: string };

/** What QEMU hands libgfapi once the connect-time checks pass. */
export interface GlusterConnection {
  volume: string;
  path: string;
  servers: GlusterVolfileServer[];
}

/** libgfapi's `glfs_new` accepts volume names made of ASCII letters, digits, `_` and `-` only (observed). */
const VOLUME_NAME = /^[A-Za-z0-9_-]*$/;

/**
 * The connect-time step of QEMU (`qemu_gluster_glfs_init`) up to the actual connection, in QEMU's order:
 * libgfapi checks the volume name (ASCII letters, digits, `_`, `-`; empty is accepted), then each server in
 * order: an inet port is converted with {@link parseGlusterPort}, so the first bad port in server order is the
 * one reported. This is the only stage that rejects JSON-form ports such as `"abc"`, `"70000"` or `"-1"`.
 *
 * @param filename The URI the options were parsed from, if any: QEMU names it in the volume-name error.
 * @example
 * resolveGlusterConnection(parseGlusterUri("gluster://127.0.0.1/testvol/a.img"));
 * // { volume: "testvol", path: "a.img", servers: [{ type: "inet", host: "127.0.0.1", port: 24007 }] }
 * @throws {GlusterError} EINVAL `Could not open '<filename>': Invalid argument` (or `Could not open image:
 *   Invalid argument` without a filename) for a volume name libgfapi refuses: QEMU gets no message from
 *   libgfapi and the block layer words it so.
 * @throws {GlusterError} EINVAL `'<port>' is not a valid port number`.
 */
export function resolveGlusterConnection(
  options: BlockdevOptionsGluster,
  filename?: string,
): GlusterConnection {
  if (!VOLUME_NAME.test(options.volume)) throw messageless(filename);
  const servers = options.server.map(
    (s): GlusterVolfileServer =>
      s.type === "inet"
        ? { type: "inet", host: s.host, port: parseGlusterPort(s.port) }
        : { type: "unix", path: s.path },
  );
  return { volume: options.volume, path: options.path, servers };
}

/** The block layer's wording when a driver fails with EINVAL and no message. */
function messageless(filename: string | undefined): GlusterError {
  return new GlusterError(
    filename ? `Could not open '${filename}': Invalid argument` : "Could not open image: Invalid argument",
  );
}
