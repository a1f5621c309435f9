import { BlkError } from "@blk/core";
import { type BlockdevOptionsGluster, GLUSTER_DEFAULT_PORT } from "./parse.ts";

const UNRESERVED = /[A-Za-z0-9\-._~]/;
const SUB_DELIMS = /[!$&'()*+,;=]/;
const LONE_SURROGATE = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/;
const encoder = new TextEncoder();

/** Percent-encodes every character of `s` except those `keep` accepts (UTF-8, upper-case hex). */
function pctEncode(s: string, keep: (ch: string) => boolean): string {
  let out = "";
  for (const ch of s) {
    if (keep(ch)) {
      out += ch;
      continue;
    }
    for (const b of encoder.encode(ch)) out += `%${b.toString(16).toUpperCase().padStart(2, "0")}`;
  }
  return out;
}

const regName = (ch: string): boolean => UNRESERVED.test(ch) || SUB_DELIMS.test(ch);
const pchar = (ch: string): boolean => regName(ch) || ch === ":" || ch === "@";
const pathChar = (ch: string): boolean => pchar(ch) || ch === "/";
// The socket value: no '&' or ';' (they would end the parameter).
const queryValueChar = (ch: string): boolean => (pchar(ch) || ch === "/") && ch !== "&" && ch !== ";";

function cannot(what: string, value: string, why: string): BlkError {
  return new BlkError("EINVAL", `gluster URI cannot express ${what} '${value}': ${why}`);
}

function checkText(what: string, value: string): void {
  if (value.includes("\0")) throw cannot(what, value, "it contains NUL");
  if (LONE_SURROGATE.test(value)) throw cannot(what, value, "it is not valid Unicode");
}

function formatHost(host: string): string {
  checkText("host", host);
  if (host === "") throw cannot("host", host, "an empty host means localhost");
  // A bracketed literal is taken verbatim up to ']' and then decoded: escape only what decoding would change.
  if (/^\[[^\]]*\]$/.test(host)) return `[${pctEncode(host.slice(1, -1), (ch) => pchar(ch))}]`;
  return pctEncode(host, regName);
}

function formatPort(port: string): string {
  if (!/^[1-9][0-9]{0,4}$/.test(port) || Number(port) > 65535) {
    throw cannot(
      "port",
      port,
      "a URI port is a decimal number 1-65535 without sign, spaces or leading zeros",
    );
  }
  return port === String(GLUSTER_DEFAULT_PORT) ? "" : `:${port}`;
}

/**
 * Writes structured gluster options back as a URL that {@link parseGlusterUri} parses to the same options, so
 * `info` can show a URL for what it was given. inet servers give `gluster://host[:port]/volume/path` (port
 * left out when it is 24007), unix servers `gluster+unix:///volume/path?socket=…`; characters that the parser
 * would treat specially are percent-encoded (UTF-8). `debug` and `logfile` are not part of a URL and are
 * ignored.
 *
 * Only what the URI grammar can express is accepted: exactly one server; a non-empty volume without `/`; a
 * non-empty image path not starting with `/`; a non-empty host; an inet port that is the plain decimal form of
 * 1-65535 (JSON ports such as `"0"`, `"+5"` or `"024008"` mean something else in a URL); no NUL or lone
 * surrogate anywhere.
 *
 * @example
 * formatGlusterUri({ volume: "testvol", path: "a.img", server: [{ type: "unix", path: "/tmp/g.sock" }] });
 * // "gluster+unix:///testvol/a.img?socket=/tmp/g.sock"
 * @throws {BlkError} EINVAL `gluster URI cannot express …` naming the field and the reason, when the options
 *   have no URL form (the caller falls back to the `json:` form).
 */
export function formatGlusterUri(options: BlockdevOptionsGluster): string {
  const { volume, path, server } = options;
  if (server.length !== 1) {
    throw new BlkError("EINVAL", `gluster URI cannot express ${server.length} servers: it holds exactly one`);
  }
  checkText("volume", volume);
  if (volume === "") throw cannot("volume", volume, "the volume must not be empty");
  if (volume.includes("/")) throw cannot("volume", volume, "'/' ends the volume name");
  checkText("path", path);
  if (path === "") throw cannot("path", path, "the image path must not be empty");
  if (path.startsWith("/")) throw cannot("path", path, "slashes after the volume are skipped");
  const tail = `/${pctEncode(volume, pchar)}/${pctEncode(path, pathChar)}`;
  const s = server[0] as (typeof server)[number];
  if (s.type === "inet") return `gluster://${formatHost(s.host)}${formatPort(s.port)}${tail}`;
  checkText("socket", s.path);
  return `gluster+unix://${tail}?socket=${pctEncode(s.path, queryValueChar)}`;
}
