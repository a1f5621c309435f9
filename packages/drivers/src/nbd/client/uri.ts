/**
 * NBD URIs as QEMU 7.2 accepts them, turned into the `nbd` driver's options (`server`, `export`).
 *
 * Forms (shared/spec/nbd.md §14): `nbd://host[:port]/export` and its QEMU-only alias `nbd+tcp://`,
 * `nbd+unix:///export?socket=PATH`, and QEMU's legacy `nbd:HOST:PORT[:exportname=NAME]` /
 * `nbd:unix:PATH[:exportname=NAME]`. The export is the path without its first `/`, percent-decoded
 * (`nbd://h//x` and `nbd://h/%2Fx` both name `/x`); an empty path names the default export. QEMU is
 * strict where libnbd is lenient: a missing host, a port above 65535, an authority on `nbd+unix`, a
 * missing `socket`, or any other query parameter is refused with `No valid URL specified`. `nbds://`
 * (TLS) is refused with ENOTSUP, as QEMU 7.2 has no such scheme (it takes `tls-creds` instead).
 */
import { BlkError } from "@blk/core";
import { NBD_DEFAULT_PORT } from "../protocol/index.ts";

/** The `nbd` driver options a URI stands for (QEMU's flat `SocketAddress`, ports as strings). */
export interface NbdUriOptions {
  server: { type: "inet"; host: string; port: string } | { type: "unix"; path: string };
  /** Absent for the default export `""`. */
  export?: string;
}

const invalid = (): BlkError => new BlkError("EINVAL", "No valid URL specified");

function decode(s: string): string {
  try {
    return decodeURIComponent(s);
  } catch {
    throw invalid();
  }
}

function withExport(server: NbdUriOptions["server"], name: string): NbdUriOptions {
  return name === "" ? { server } : { server, export: name };
}

/** `host:port` or `[v6]:port` of the legacy syntax. */
function legacyInet(s: string): { host: string; port: string } {
  let host: string;
  let rest: string;
  if (s.startsWith("[")) {
    const end = s.indexOf("]");
    if (end < 0) throw invalid();
    host = s.slice(1, end);
    rest = s.slice(end + 1);
  } else {
    const colon = s.lastIndexOf(":");
    if (colon < 0) throw new BlkError("EINVAL", `address '${s}' has no port`);
    host = s.slice(0, colon);
    rest = s.slice(colon);
  }
  if (!rest.startsWith(":") || host === "") throw new BlkError("EINVAL", `address '${s}' has no port`);
  const port = rest.slice(1);
  if (!/^\d{1,5}$/.test(port) || Number(port) > 65535)
    throw new BlkError("EINVAL", `Port '${port}' is invalid`);
  return { host, port };
}

function parseLegacy(spec: string): NbdUriOptions {
  let addr = spec;
  let name = "";
  const at = spec.indexOf(":exportname=");
  if (at >= 0) {
    addr = spec.slice(0, at);
    name = spec.slice(at + ":exportname=".length);
  }
  if (addr.startsWith("unix:")) {
    const path = addr.slice("unix:".length);
    if (path === "") throw invalid();
    return withExport({ type: "unix", path }, name);
  }
  return withExport({ type: "inet", ...legacyInet(addr) }, name);
}

/**
 * Parses an NBD URI with QEMU 7.2's rules.
 * @example
 * parseNbdUri("nbd+unix:///disk?socket=/tmp/nbd.sock");
 * // → { server: { type: "unix", path: "/tmp/nbd.sock" }, export: "disk" }
 * parseNbdUri("nbd://[::1]:10809//x"); // → { server: { type: "inet", host: "::1", port: "10809" }, export: "/x" }
 * @throws {BlkError} EINVAL `No valid URL specified` (or `Unknown protocol 'X'`); ENOTSUP for `nbds…` (TLS)
 */
export function parseNbdUri(uri: string): NbdUriOptions {
  const m = /^([A-Za-z][A-Za-z0-9+.-]*):(.*)$/s.exec(uri);
  if (m === null) throw invalid();
  const scheme = (m[1] ?? "").toLowerCase();
  let rest = m[2] ?? "";
  if (scheme === "nbd" && !rest.startsWith("//")) return parseLegacy(rest);
  let transport: "inet" | "unix";
  if (scheme === "nbd" || scheme === "nbd+tcp") transport = "inet";
  else if (scheme === "nbd+unix") transport = "unix";
  else if (scheme.startsWith("nbds")) throw new BlkError("ENOTSUP", `Unknown protocol '${scheme}'`);
  else throw new BlkError("EINVAL", `Unknown protocol '${scheme}'`);

  const hash = rest.indexOf("#");
  if (hash >= 0) rest = rest.slice(0, hash);
  let query: string | undefined;
  const qm = rest.indexOf("?");
  if (qm >= 0) {
    query = rest.slice(qm + 1);
    rest = rest.slice(0, qm);
  }
  let authority: string | undefined;
  let path = rest;
  if (rest.startsWith("//")) {
    const slash = rest.indexOf("/", 2);
    authority = slash < 0 ? rest.slice(2) : rest.slice(2, slash);
    path = slash < 0 ? "" : rest.slice(slash);
  }
  const params =
    query === undefined || query === ""
      ? []
      : query.split("&").map((kv) => {
          const eq = kv.indexOf("=");
          return eq < 0
            ? { key: decode(kv), value: undefined }
            : { key: decode(kv.slice(0, eq)), value: decode(kv.slice(eq + 1)) };
        });
  const name = decode(path.startsWith("/") ? path.slice(1) : path);

  if (transport === "unix") {
    if (authority !== undefined && authority !== "") throw invalid();
    const p = params[0];
    if (
      params.length !== 1 ||
      p === undefined ||
      p.key !== "socket" ||
      p.value === undefined ||
      p.value === ""
    ) {
      throw invalid();
    }
    return withExport({ type: "unix", path: p.value }, name);
  }

  if (params.length > 0 || authority === undefined) throw invalid();
  const hostPort = authority.slice(authority.lastIndexOf("@") + 1);
  let host: string;
  let portText: string | undefined;
  if (hostPort.startsWith("[")) {
    const end = hostPort.indexOf("]");
    if (end < 0) throw invalid();
    host = hostPort.slice(1, end);
    const after = hostPort.slice(end + 1);
    if (after !== "" && !after.startsWith(":")) throw invalid();
    portText = after === "" ? undefined : after.slice(1);
  } else {
    const colon = hostPort.indexOf(":");
    host = colon < 0 ? hostPort : hostPort.slice(0, colon);
    portText = colon < 0 ? undefined : hostPort.slice(colon + 1);
  }
  host = decode(host);
  if (host === "") throw invalid();
  let port = NBD_DEFAULT_PORT;
  if (portText !== undefined && portText !== "") {
    if (!/^\d+$/.test(portText)) throw invalid();
    port = Number(portText);
    if (port > 65535) throw invalid();
  }
  return withExport({ type: "inet", host, port: String(port) }, name);
}

/**
 * The URI QEMU reports as the filename of an `nbd` node: `nbd://HOST:PORT[/EXPORT]` (IPv6 hosts are
 * printed without brackets, as QEMU does) or `nbd+unix://[/EXPORT]?socket=PATH`.
 */
export function formatNbdUri(options: NbdUriOptions): string {
  const name = options.export ?? "";
  const s = options.server;
  if (s.type === "unix")
    return name === "" ? `nbd+unix://?socket=${s.path}` : `nbd+unix:///${name}?socket=${s.path}`;
  return name === "" ? `nbd://${s.host}:${s.port}` : `nbd://${s.host}:${s.port}/${name}`;
}
