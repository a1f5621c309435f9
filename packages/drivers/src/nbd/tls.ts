/**
 * TLS credentials in QEMU's file layout (`tls-creds-psk`, `tls-creds-x509` objects), turned into Node
 * `tls` options for both ends of an NBD connection.
 *
 * Layout of `dir`: PSK — `keys.psk`, lines `USERNAME:HEXKEY` (the client uses `username`, default
 * `qemu`; the server accepts any listed identity). x509 — `ca-cert.pem` (always), `server-cert.pem` and
 * `server-key.pem` (server), `client-cert.pem` and `client-key.pem` (client, optional), `ca-crl.pem`
 * and `dh-params.pem` (optional). Files are read once, when the credentials are created, with QEMU's
 * `Unable to access credentials PATH: REASON` on a missing required file.
 *
 * Interoperability with GnuTLS peers (qemu-nbd/qemu-img/qemu-storage-daemon 7.2, libnbd 1.14; Node 20
 * with OpenSSL 3.0), checked by experiment and by the `nbd-tls*.qemu` tests:
 * - PSK: GnuTLS negotiates TLS 1.3 (seen: TLS_CHACHA20_POLY1305_SHA256) and OpenSSL's PSK callbacks
 *   work there unchanged, both as client and as server. TLS 1.2 PSK also works, but only when the
 *   cipher list names PSK suites (Node's default list has none), so `PSK` is appended to the defaults.
 * - x509: TLS 1.3 (TLS_AES_256_GCM_SHA384) both ways, client certificates verified (`verify-peer`).
 * - The server side must go through a `tls.Server` (given the raw socket as a `connection`): a bare
 *   `TLSSocket` in server mode never checks the peer's certificate chain.
 */
import { readFileSync } from "node:fs";
import {
  type ConnectionOptions,
  checkServerIdentity,
  DEFAULT_CIPHERS,
  type PeerCertificate,
  type TlsOptions,
} from "node:tls";
import { BlkError, isBlkError } from "@blk/core";

/** Which end of a connection the credentials are for (QEMU's `QCryptoTLSCredsEndpoint`). */
export type TlsEndpoint = "server" | "client";

/** Properties of a `tls-creds-psk` object. */
export interface TlsCredsPskOptions {
  type: "psk";
  /** Default `client`, as QEMU's. */
  endpoint?: TlsEndpoint;
  /** Directory holding `keys.psk`. */
  dir: string;
  /** Client identity looked up in `keys.psk` (default `qemu`). */
  username?: string;
}

/** Properties of a `tls-creds-x509` object. */
export interface TlsCredsX509Options {
  type: "x509";
  endpoint?: TlsEndpoint;
  /** Directory holding the PEM files. */
  dir: string;
  /** Verify the peer's certificate (default true): a server then requires a client certificate. */
  verifyPeer?: boolean;
}

export type TlsCredsOptions = TlsCredsPskOptions | TlsCredsX509Options;

/** The PEM files of x509 credentials. */
interface PemFiles {
  ca: Buffer;
  cert?: Buffer;
  key?: Buffer;
  crl?: Buffer;
  dhparam?: Buffer;
}

/** TLS suites offered on top of Node's defaults: OpenSSL's PSK suites (TLS 1.2 only needs them). */
const PSK_CIPHERS = `${DEFAULT_CIPHERS}:PSK`;

const ERRNO_TEXT: Record<string, string> = {
  ENOENT: "No such file or directory",
  EACCES: "Permission denied",
  EISDIR: "Is a directory",
  ENOTDIR: "Not a directory",
};

function errnoText(e: NodeJS.ErrnoException): string {
  return ERRNO_TEXT[e.code ?? ""] ?? e.message;
}

/** Reads `dir/name`; a missing required file is QEMU's error, a missing optional one is `undefined`. */
function readCred(dir: string, name: string, required: true): Buffer;
function readCred(dir: string, name: string, required: boolean): Buffer | undefined;
function readCred(dir: string, name: string, required: boolean): Buffer | undefined {
  const path = `${dir}/${name}`;
  try {
    return readFileSync(path);
  } catch (e) {
    const err = e as NodeJS.ErrnoException;
    if (!required && err.code === "ENOENT") return undefined;
    throw new BlkError(
      err.code === "ENOENT" ? "ENOENT" : "EIO",
      `Unable to access credentials ${path}: ${errnoText(err)}`,
      { cause: e },
    );
  }
}

/** Parses `keys.psk`: `USERNAME:HEXKEY` lines (blank lines ignored). */
function parsePskFile(path: string, text: string): Map<string, Buffer> {
  const keys = new Map<string, Buffer>();
  for (const raw of text.split("\n")) {
    const line = raw.replace(/\r$/, "");
    if (line.trim() === "") continue;
    const colon = line.indexOf(":");
    const hex = colon < 0 ? "" : line.slice(colon + 1).trim();
    if (colon <= 0 || hex.length === 0 || hex.length % 2 !== 0 || !/^[0-9a-fA-F]+$/.test(hex)) {
      throw new BlkError("EINVAL", `Cannot parse PSK file ${path}`);
    }
    const user = line.slice(0, colon);
    if (!keys.has(user)) keys.set(user, Buffer.from(hex, "hex"));
  }
  return keys;
}

/**
 * Loaded TLS credentials. `ref`/`unref` count the servers and connections using them, so an owner
 * (the daemon's `object-del`) can refuse to drop credentials in use.
 * @example
 * const creds = TlsCreds.load({ type: "psk", endpoint: "server", dir: "/etc/blk/psk" });
 * const server = new NbdServer({ tls: { creds } });
 */
export class TlsCreds {
  readonly type: "psk" | "x509";
  readonly endpoint: TlsEndpoint;
  readonly dir: string;
  readonly verifyPeer: boolean;
  /** PSK client identity. */
  readonly username: string;
  readonly #pskPath: string;
  readonly #psk: Map<string, Buffer> | undefined;
  readonly #pem: PemFiles | undefined;
  #users = 0;

  private constructor(options: TlsCredsOptions) {
    this.type = options.type;
    this.endpoint = options.endpoint ?? "client";
    this.dir = options.dir;
    this.verifyPeer = options.type === "x509" ? (options.verifyPeer ?? true) : true;
    this.username = (options.type === "psk" ? options.username : undefined) ?? "qemu";
    this.#pskPath = `${options.dir}/keys.psk`;
    if (options.type === "psk") {
      this.#psk = parsePskFile(this.#pskPath, readCred(options.dir, "keys.psk", true).toString("utf8"));
      return;
    }
    const server = this.endpoint === "server";
    const ca = readCred(options.dir, "ca-cert.pem", true);
    const crl = readCred(options.dir, "ca-crl.pem", false);
    const cert = readCred(options.dir, server ? "server-cert.pem" : "client-cert.pem", server);
    const key = readCred(options.dir, server ? "server-key.pem" : "client-key.pem", server);
    const dhparam = server ? readCred(options.dir, "dh-params.pem", false) : undefined;
    this.#pem = {
      ca,
      ...(cert === undefined ? {} : { cert }),
      ...(key === undefined ? {} : { key }),
      ...(crl === undefined ? {} : { crl }),
      ...(dhparam === undefined ? {} : { dhparam }),
    };
  }

  /**
   * Reads the credential files of `dir`.
   * @throws {BlkError} EINVAL `Missing 'dir' property value`, or a malformed `keys.psk`; ENOENT/EIO
   * `Unable to access credentials PATH: REASON` for a required file
   */
  static load(options: TlsCredsOptions): TlsCreds {
    if (typeof options.dir !== "string" || options.dir === "")
      throw new BlkError("EINVAL", "Missing 'dir' property value");
    return new TlsCreds(options);
  }

  /** Servers and connections currently using the credentials. */
  get users(): number {
    return this.#users;
  }
  ref(): void {
    this.#users++;
  }
  unref(): void {
    if (this.#users > 0) this.#users--;
  }

  /** @throws {BlkError} EINVAL unless the credentials are for `endpoint` (QEMU's message). */
  checkEndpoint(endpoint: TlsEndpoint): void {
    if (this.endpoint !== endpoint)
      throw new BlkError("EINVAL", `Expected TLS credentials for a ${endpoint} endpoint`);
  }

  /** Options for a `tls.Server` that upgrades accepted sockets (server endpoint). */
  serverOptions(): TlsOptions {
    this.checkEndpoint("server");
    const psk = this.#psk;
    if (psk !== undefined) {
      return {
        ciphers: PSK_CIPHERS,
        pskCallback: (_socket, identity) => psk.get(identity) ?? null,
      };
    }
    const pem = this.#pem as PemFiles;
    return {
      ca: pem.ca,
      ...(pem.cert === undefined ? {} : { cert: pem.cert }),
      ...(pem.key === undefined ? {} : { key: pem.key }),
      ...(pem.crl === undefined ? {} : { crl: pem.crl }),
      ...(pem.dhparam === undefined ? {} : { dhparam: pem.dhparam }),
      requestCert: this.verifyPeer,
      rejectUnauthorized: this.verifyPeer,
    };
  }

  /**
   * Options for `tls.connect({ socket, ... })` (client endpoint). x509 with `verify-peer` checks the
   * chain and, when `hostname` is given, that the certificate names it.
   * @throws {BlkError} EINVAL for server credentials, a PSK username missing from `keys.psk`, or x509
   * peer verification without a host name (QEMU's messages)
   */
  clientOptions(hostname: string | undefined): ConnectionOptions {
    this.checkEndpoint("client");
    const psk = this.#psk;
    if (psk !== undefined) {
      const key = psk.get(this.username);
      if (key === undefined)
        throw new BlkError("EINVAL", `Username ${this.username} not found in PSK file ${this.#pskPath}`);
      const identity = this.username;
      return {
        ciphers: PSK_CIPHERS,
        pskCallback: () => ({ psk: key, identity }),
        // No certificate is involved: there is no server identity to check.
        checkServerIdentity: () => undefined,
      };
    }
    const pem = this.#pem as PemFiles;
    if (this.verifyPeer && hostname === undefined)
      throw new BlkError("EINVAL", "No hostname for certificate validation");
    return {
      ca: pem.ca,
      ...(pem.cert === undefined ? {} : { cert: pem.cert }),
      ...(pem.key === undefined ? {} : { key: pem.key }),
      ...(pem.crl === undefined ? {} : { crl: pem.crl }),
      ...(hostname === undefined || /^[\d.]+$|:/.test(hostname) ? {} : { servername: hostname }),
      rejectUnauthorized: this.verifyPeer,
      checkServerIdentity: (_host: string, cert: PeerCertificate) => {
        if (!this.verifyPeer || hostname === undefined) return undefined;
        return checkServerIdentity(hostname, cert) === undefined
          ? undefined
          : new Error(`Certificate does not match the hostname ${hostname}`);
      },
    };
  }
}

/** A TLS failure as QEMU words it (`TLS handshake failed: …`), keeping BlkErrors as they are. */
export function tlsHandshakeError(e: unknown): BlkError {
  if (isBlkError(e)) return e;
  const message = e instanceof Error ? e.message : String(e);
  if (message.startsWith("Certificate does not match")) return new BlkError("EACCES", message, { cause: e });
  return new BlkError("EIO", `TLS handshake failed: ${message}`, { cause: e });
}
