/**
 * `NbdClient`: one NBD connection. Fixed-newstyle handshake (with `tls`, `NBD_OPT_STARTTLS` and the TLS
 * handshake first, on the same socket; then `NBD_OPT_STRUCTURED_REPLY`,
 * `NBD_OPT_SET_META_CONTEXT`, `NBD_OPT_GO` asking for `NBD_INFO_BLOCK_SIZE`, `NBD_OPT_EXPORT_NAME` only when
 * GO is unsupported), then pipelined transmission: requests are matched to replies by cookie, the number
 * in flight is bounded, socket backpressure is obeyed, and READ/WRITE are split at the server's maximum
 * payload.
 *
 * Two kinds of failure are kept apart: a per-request error (an NBD errno in a reply) rejects that request
 * with a {@link BlkError} and the connection carries on; a broken stream (an {@link NbdProtocolError}, a
 * closed or failed socket, the watchdog firing) kills the connection and rejects every pending and later
 * request with `BlkError` EIO whose `cause` says why.
 *
 * References: NetworkBlockDevice/nbd `doc/proto.md` — "Fixed newstyle negotiation", "Option types",
 * "Structured reply chunk message", "Request types", "Size constraints", "Error values",
 * "Metadata querying", "TLS support"; /work/shared/spec/nbd.md §2–§11.
 */
import { connect as netConnect, type Socket } from "node:net";
import { type TLSSocket, connect as tlsConnect } from "node:tls";
import { BlkError } from "@blk/core";
import {
  decodeBlockStatus,
  decodeErrorChunk,
  decodeOffsetData,
  decodeOffsetHole,
  decodeRepInfo,
  decodeRepMetaContext,
  decodeString,
  encodeClientFlags,
  encodeInfoRequestData,
  encodeMetaContextRequestData,
  encodeOption,
  encodeRequest,
  encodeString,
  META_BASE_ALLOCATION,
  NBD_CMD,
  NBD_CMD_FLAG,
  NBD_FLAG,
  NBD_FLAG_C,
  NBD_INFO,
  NBD_MAX_PAYLOAD,
  NBD_MAX_STRING,
  NBD_OPT,
  NBD_REP,
  NBD_REP_FLAG_ERROR,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE,
  NBD_REPLY_TYPE_ERROR_BIT,
  NBD_TFLAG,
  NbdProtocolError,
  type NbdServerMessage,
  NbdServerStreamParser,
} from "../protocol/index.ts";
import { type TlsCreds, tlsHandshakeError } from "../tls.ts";
import { connectionLost, optionError, requestError } from "./errors.ts";

/** Where the server listens: QEMU's flat `SocketAddress` subset (`port` may be a string, as in QAPI). */
export type NbdServerAddress =
  | { type: "unix"; path: string }
  | { type: "inet"; host: string; port: string | number };

/** Options of {@link NbdClient.connect}. */
export interface NbdClientOptions {
  /** The server's address. */
  server: NbdServerAddress;
  /** Export name (default `""`, the default export). */
  export?: string;
  /**
   * Metadata contexts to select with `NBD_OPT_SET_META_CONTEXT` (default `["base:allocation"]`; `[]`
   * selects none). Only negotiated when structured replies are. See {@link NbdClient.contexts}.
   */
  metaContexts?: readonly string[];
  /** Negotiate structured replies (default true; false is for tests of the simple-reply path). */
  structuredReplies?: boolean;
  /** Requests in flight on the wire at most (default 16, QEMU's limit); more wait for a free slot. */
  maxInFlight?: number;
  /** Milliseconds for connecting plus the handshake (default 30 000; 0 = no limit). */
  connectTimeoutMs?: number;
  /**
   * Milliseconds without any byte from the server while requests are pending before the connection is
   * declared dead (default 0 = never). One watchdog timer, refreshed by every byte received.
   */
  requestTimeoutMs?: number;
  /**
   * TLS: `NBD_OPT_STARTTLS` first, then the TLS handshake with client credentials, then the usual
   * haggling over TLS. `hostname` is what an x509 server certificate must name (default: the inet host;
   * QEMU's `tls-hostname`).
   */
  tls?: { creds: TlsCreds; hostname?: string };
}

/** Largest payload gathered in the client's reused scratch buffer; larger ones get their own. */
const SCRATCH_MAX = 4 << 20;

/** Flags of {@link NbdClient.read}. */
export interface NbdReadFlags {
  /** `NBD_CMD_FLAG_DF`: the server must answer with one chunk (needs `canDf`). */
  df?: boolean;
}

/** Flags of {@link NbdClient.write} and {@link NbdClient.trim}. */
export interface NbdFuaFlags {
  /** `NBD_CMD_FLAG_FUA`: the data is durable when the reply comes (needs `canFua`). */
  fua?: boolean;
}

/** Flags of {@link NbdClient.writeZeroes}. */
export interface NbdZeroFlags extends NbdFuaFlags {
  /** `NBD_CMD_FLAG_NO_HOLE`: the server must allocate (not punch a hole). */
  noHole?: boolean;
  /** `NBD_CMD_FLAG_FAST_ZERO`: fail with ENOTSUP unless zeroing is fast (needs `canFastZero`). */
  fastZero?: boolean;
}

/** One block-status extent, with its offset worked out. */
export interface NbdStatusExtent {
  offset: number;
  length: number;
  /** Context-specific flags (`base:allocation`: bit 0 hole, bit 1 zero). */
  flags: number;
}

/** Flags of {@link NbdClient.blockStatus}. */
export interface NbdBlockStatusFlags {
  /** `NBD_CMD_FLAG_REQ_ONE`: one extent per context, not longer than the request. */
  reqOne?: boolean;
}

/** Largest length of a payload-less command (TRIM, WRITE_ZEROES, BLOCK_STATUS): 1 GiB, aligned to any block. */
const MAX_NO_PAYLOAD = 1 << 30;

interface Pending {
  cookie: bigint;
  type: number;
  offset: number;
  length: number;
  /** READ destination. */
  buf: Uint8Array | undefined;
  /** READ: content bytes received so far. */
  covered: number;
  /** BLOCK_STATUS: extents by context name. */
  status: Map<string, NbdStatusExtent[]> | undefined;
  /** First error chunk received. */
  error: BlkError | undefined;
  resolve: () => void;
  reject: (e: Error) => void;
}

type OptionReply = { option: number; type: number; data: Uint8Array };

const utf8Length = (s: string): number => new TextEncoder().encode(s).length;
const isPow2 = (n: number): boolean => n > 0 && (n & (n - 1)) === 0;
const alignDown = (n: number, a: number): number => n - (n % a);

const SOCKET_ERRORS: Record<string, string> = {
  ECONNREFUSED: "Connection refused",
  ENOENT: "No such file or directory",
  EACCES: "Permission denied",
  ETIMEDOUT: "Connection timed out",
  EHOSTUNREACH: "No route to host",
  ENETUNREACH: "Network is unreachable",
  ENOTFOUND: "Name or service not known",
  EAI_AGAIN: "Temporary failure in name resolution",
  ECONNRESET: "Connection reset by peer",
  EPIPE: "Broken pipe",
};

function describeAddress(a: NbdServerAddress): string {
  return a.type === "unix" ? a.path : `${a.host}:${a.port}`;
}

function parsePort(port: string | number): number {
  const n = typeof port === "number" ? port : /^\d{1,5}$/.test(port) ? Number(port) : Number.NaN;
  if (!Number.isInteger(n) || n < 0 || n > 65535) {
    throw new BlkError("EINVAL", `Port '${port}' is not a valid port number`);
  }
  return n;
}

function openSocket(address: NbdServerAddress, timeoutMs: number): Promise<Socket> {
  return new Promise((resolve, reject) => {
    // Checked at run time too: JavaScript callers may pass QAPI's `vsock` or `fd`.
    const type: string = address.type;
    if (type !== "inet" && type !== "unix") {
      reject(new BlkError("ENOTSUP", `NBD server address type '${type}' is not supported`));
      return;
    }
    let port = 0;
    if (address.type === "inet") {
      try {
        port = parsePort(address.port);
      } catch (e) {
        reject(e as Error);
        return;
      }
    }
    const socket =
      address.type === "unix" ? netConnect({ path: address.path }) : netConnect({ host: address.host, port });
    const timer =
      timeoutMs > 0
        ? setTimeout(() => {
            socket.destroy();
            reject(
              new BlkError(
                "ETIMEDOUT",
                `Failed to connect to '${describeAddress(address)}': Connection timed out`,
              ),
            );
          }, timeoutMs)
        : undefined;
    const onError = (e: NodeJS.ErrnoException): void => {
      clearTimeout(timer);
      const why = SOCKET_ERRORS[e.code ?? ""] ?? e.message;
      reject(new BlkError("EIO", `Failed to connect to '${describeAddress(address)}': ${why}`, { cause: e }));
    };
    socket.once("error", onError);
    socket.once("connect", () => {
      clearTimeout(timer);
      socket.off("error", onError);
      if (address.type === "inet") socket.setNoDelay(true);
      resolve(socket);
    });
  });
}

/**
 * One connection to an NBD server, in transmission phase once {@link NbdClient.connect} resolves.
 * @example
 * await using nbd = await NbdClient.connect({ server: { type: "unix", path: "/tmp/nbd.sock" }, export: "disk" });
 * const data = await nbd.read(0, 4096);
 * await nbd.write(4096, data, { fua: true });
 * const map = await nbd.blockStatus(0, nbd.size);   // Map { "base:allocation" => [{offset, length, flags}, …] }
 */
export class NbdClient implements AsyncDisposable {
  /** Export name as requested. */
  readonly exportName: string;
  #socket: Socket;
  readonly #tlsOptions: NbdClientOptions["tls"];
  readonly #server: NbdServerAddress;
  #encrypted = false;
  readonly #parser: NbdServerStreamParser;
  readonly #maxInFlight: number;
  readonly #requestTimeoutMs: number;
  readonly #wantStructured: boolean;
  readonly #wantContexts: readonly string[];
  #phase: "handshake" | "transmission" | "closed" = "handshake";
  #size = 0;
  #tflags = 0;
  #structured = false;
  #minBlock = 1;
  #preferredBlock = 4096;
  #maxBlock = NBD_MAX_PAYLOAD;
  #maxPayload = NBD_MAX_PAYLOAD;
  #contexts = new Map<string, number>();
  #contextNames = new Map<number, string>();
  #usedGo = true;
  #scratch = new Uint8Array(0);

  // handshake receive
  #waiter: { resolve: (m: NbdServerMessage) => void; reject: (e: Error) => void } | undefined;
  // transmission
  #pending = new Map<bigint, Pending>();
  #cookieSeq = 0;
  /** Requests holding a slot (pending on the wire, or about to be sent). */
  #reserved = 0;
  /** Requests waiting for a slot: called with true when a slot is handed over, false when the client died. */
  #slots: ((handed: boolean) => void)[] = [];
  #drain: Promise<void> | undefined;
  #drainResolve: (() => void) | undefined;
  #idle: (() => void)[] = [];
  #watchdog: NodeJS.Timeout | undefined;
  #failed: BlkError | undefined;
  #shutdown: BlkError | undefined;
  #closing: Promise<void> | undefined;
  #socketClosed: Promise<void>;

  private constructor(socket: Socket, options: NbdClientOptions) {
    this.exportName = options.export ?? "";
    this.#socket = socket;
    this.#tlsOptions = options.tls;
    this.#server = options.server;
    this.#maxInFlight = Math.max(1, options.maxInFlight ?? 16);
    this.#requestTimeoutMs = options.requestTimeoutMs ?? 0;
    this.#wantStructured = options.structuredReplies ?? true;
    this.#wantContexts = options.metaContexts ?? [META_BASE_ALLOCATION];
    this.#parser = new NbdServerStreamParser({
      readLength: (cookie) => {
        const p = this.#pending.get(cookie);
        return p !== undefined && p.type === NBD_CMD.READ ? p.length : undefined;
      },
      // Replies are dispatched (copied or decoded) before the parser is asked for the next message, so
      // payloads can share one scratch buffer instead of a new allocation each (large ones excepted).
      allocatePayload: (n) => {
        if (n > SCRATCH_MAX) return new Uint8Array(n);
        if (this.#scratch.length < n) this.#scratch = new Uint8Array(Math.max(n, 2 * this.#scratch.length));
        return this.#scratch.subarray(0, n);
      },
    });
    this.#socketClosed = this.#listen(socket);
  }

  #onSocketData = (chunk: Buffer): void => this.#onData(chunk);
  #onSocketError = (e: Error): void => this.#fail(connectionLost(`NBD connection failed: ${e.message}`, e));
  #onSocketClose = (): void => {
    if (this.#phase !== "closed") this.#fail(connectionLost("Connection closed by the NBD server"));
  };

  /** Attaches the receive path to `socket`; resolves when it closes. */
  #listen(socket: Socket): Promise<void> {
    const closed = new Promise<void>((resolve) => socket.once("close", () => resolve()));
    socket.on("data", this.#onSocketData);
    socket.on("error", this.#onSocketError);
    socket.on("close", this.#onSocketClose);
    return closed;
  }

  /**
   * Connects and negotiates; resolves in transmission phase.
   * @throws {BlkError} EIO when the connection fails (`Failed to connect to 'ADDR': REASON`) or the
   * server breaks the protocol (cause: an {@link NbdProtocolError}); ENOENT for an unknown export;
   * EPERM when the server requires TLS; ETIMEDOUT after `connectTimeoutMs`; the mapped code of any
   * other option error.
   */
  static async connect(options: NbdClientOptions): Promise<NbdClient> {
    const name = options.export ?? "";
    if (utf8Length(name) > NBD_MAX_STRING) {
      throw new BlkError("EINVAL", `Export name is longer than ${NBD_MAX_STRING} bytes`);
    }
    const timeoutMs = options.connectTimeoutMs ?? 30_000;
    const started = Date.now();
    const socket = await openSocket(options.server, timeoutMs);
    const client = new NbdClient(socket, options);
    const left = timeoutMs > 0 ? Math.max(1, timeoutMs - (Date.now() - started)) : 0;
    if (left > 0) {
      client.#watchdog = setTimeout(() => {
        client.#fail(new BlkError("ETIMEDOUT", "NBD handshake timed out"));
      }, left);
      client.#watchdog.unref();
    }
    try {
      await client.#handshake();
    } catch (e) {
      client.#abort();
      const err =
        e instanceof BlkError
          ? e
          : e instanceof NbdProtocolError
            ? connectionLost(`NBD handshake failed: ${e.message}`, e)
            : connectionLost("NBD handshake failed", e);
      client.#fail(err);
      throw err;
    }
    return client;
  }

  // ---- negotiated properties ---------------------------------------------------------------------------

  /** Export size in bytes. */
  get size(): number {
    return this.#size;
  }
  /** Transmission flags ({@link NBD_TFLAG}). */
  get transmissionFlags(): number {
    return this.#tflags;
  }
  /** Structured replies were negotiated. */
  get structuredReplies(): boolean {
    return this.#structured;
  }
  /** Transmission began with `NBD_OPT_GO` (false: the `NBD_OPT_EXPORT_NAME` fallback). */
  get usedGo(): boolean {
    return this.#usedGo;
  }
  /** Selected metadata contexts: name → id (empty without structured replies or when none matched). */
  get contexts(): ReadonlyMap<string, number> {
    return this.#contexts;
  }
  /** Minimum block size: offsets and lengths must be multiples (1 unless the server says otherwise). */
  get minimumBlockSize(): number {
    return this.#minBlock;
  }
  /** Preferred block size (4096 unless the server says otherwise). */
  get preferredBlockSize(): number {
    return this.#preferredBlock;
  }
  /** Maximum payload the server advertised (0xffffffff = no limit; 32 MiB when it advertised none). */
  get maximumBlockSize(): number {
    return this.#maxBlock;
  }
  /** Largest READ/WRITE this client sends: the server's maximum, at most 32 MiB, aligned to the minimum. */
  get maxPayload(): number {
    return this.#maxPayload;
  }
  /** The export is read-only. */
  get readOnly(): boolean {
    return (this.#tflags & NBD_TFLAG.READ_ONLY) !== 0;
  }
  /** FLUSH is supported. */
  get canFlush(): boolean {
    return (this.#tflags & NBD_TFLAG.SEND_FLUSH) !== 0;
  }
  /** The FUA flag is supported. */
  get canFua(): boolean {
    return (this.#tflags & NBD_TFLAG.SEND_FUA) !== 0;
  }
  /** TRIM is supported. */
  get canTrim(): boolean {
    return (this.#tflags & NBD_TFLAG.SEND_TRIM) !== 0;
  }
  /** WRITE_ZEROES (and NO_HOLE) is supported. */
  get canZero(): boolean {
    return (this.#tflags & NBD_TFLAG.SEND_WRITE_ZEROES) !== 0;
  }
  /** FAST_ZERO is supported. */
  get canFastZero(): boolean {
    return this.canZero && (this.#tflags & NBD_TFLAG.SEND_FAST_ZERO) !== 0;
  }
  /** The DF read flag is supported. */
  get canDf(): boolean {
    return this.#structured && (this.#tflags & NBD_TFLAG.SEND_DF) !== 0;
  }
  /** Flush and FUA are visible across connections. */
  get canMultiConn(): boolean {
    return (this.#tflags & NBD_TFLAG.CAN_MULTI_CONN) !== 0;
  }
  /** BLOCK_STATUS can be used (structured replies and at least one context). */
  get canBlockStatus(): boolean {
    return this.#structured && this.#contexts.size > 0;
  }

  /** The connection is encrypted (STARTTLS succeeded). */
  get tls(): boolean {
    return this.#encrypted;
  }

  /** Requests sent and not yet answered. */
  get inFlight(): number {
    return this.#pending.size;
  }
  /** The error that killed the connection, if it is dead. */
  get error(): BlkError | undefined {
    return this.#failed;
  }
  /** True once the connection is closed or dead. */
  get closed(): boolean {
    return this.#phase === "closed" || this.#closing !== undefined;
  }

  // ---- handshake ---------------------------------------------------------------------------------------

  #recv(): Promise<NbdServerMessage> {
    if (this.#failed) return Promise.reject(this.#failed);
    const m = this.#parser.next();
    if (m !== undefined) return Promise.resolve(m);
    return new Promise((resolve, reject) => {
      this.#waiter = { resolve, reject };
    });
  }

  #wakeHandshake(): void {
    const w = this.#waiter;
    if (w === undefined) return;
    let m: NbdServerMessage | undefined;
    try {
      m = this.#parser.next();
    } catch (e) {
      this.#waiter = undefined;
      w.reject(e as Error);
      return;
    }
    if (m === undefined) return;
    this.#waiter = undefined;
    w.resolve(m);
  }

  #send(bytes: Uint8Array): void {
    if (this.#socket.write(bytes) || this.#drain !== undefined) return;
    this.#drain = new Promise((resolve) => {
      this.#drainResolve = resolve;
    });
    this.#socket.once("drain", () => this.#releaseDrain());
  }

  #releaseDrain(): void {
    const r = this.#drainResolve;
    this.#drain = undefined;
    this.#drainResolve = undefined;
    r?.();
  }

  /** Sends an option and collects its replies up to the final one (ACK or an error). */
  async #option(option: number, data?: Uint8Array): Promise<{ replies: OptionReply[]; final: OptionReply }> {
    this.#send(encodeOption(option, data));
    const replies: OptionReply[] = [];
    for (;;) {
      const m = await this.#recv();
      if (m.kind !== "option-reply") {
        throw new NbdProtocolError("UNEXPECTED", `expected an option reply, got ${m.kind}`);
      }
      if (m.option !== option) {
        throw new NbdProtocolError(
          "BAD_VALUE",
          `reply for option ${m.option} while waiting for option ${option}`,
        );
      }
      const r = { option: m.option, type: m.type, data: m.data };
      if (m.type === NBD_REP.ACK || (m.type & NBD_REP_FLAG_ERROR) !== 0) return { replies, final: r };
      replies.push(r);
    }
  }

  #optionFailure(final: OptionReply): BlkError {
    let message = "";
    try {
      message = decodeString(final.data, "error message");
    } catch {
      // a broken message does not hide the error itself
    }
    return optionError(final.option, final.type, message);
  }

  /** Errors that end the handshake whatever the option: the server cannot go on with us. */
  static #fatalOptionError(type: number): boolean {
    return type === NBD_REP.ERR_TLS_REQD || type === NBD_REP.ERR_SHUTDOWN;
  }

  async #handshake(): Promise<void> {
    const g = await this.#recv();
    if (g.kind !== "greeting")
      throw new NbdProtocolError("UNEXPECTED", `expected the greeting, got ${g.kind}`);
    const fixed = (g.handshakeFlags & NBD_FLAG.FIXED_NEWSTYLE) !== 0;
    const noZeroes = (g.handshakeFlags & NBD_FLAG.NO_ZEROES) !== 0;
    this.#send(
      encodeClientFlags((fixed ? NBD_FLAG_C.FIXED_NEWSTYLE : 0) | (noZeroes ? NBD_FLAG_C.NO_ZEROES : 0)),
    );
    if (this.#tlsOptions !== undefined) {
      if (!fixed) throw new BlkError("ENOTSUP", "Server does not support STARTTLS");
      const { final } = await this.#option(NBD_OPT.STARTTLS);
      if (final.type !== NBD_REP.ACK) throw this.#optionFailure(final);
      await this.#startTls(this.#tlsOptions);
    }
    if (!fixed) {
      await this.#exportNameFallback(noZeroes);
      return;
    }
    if (this.#wantStructured) {
      const { final } = await this.#option(NBD_OPT.STRUCTURED_REPLY);
      if (final.type === NBD_REP.ACK) this.#structured = true;
      else if (NbdClient.#fatalOptionError(final.type)) throw this.#optionFailure(final);
    }
    if (this.#structured && this.#wantContexts.length > 0) {
      const { replies, final } = await this.#option(
        NBD_OPT.SET_META_CONTEXT,
        encodeMetaContextRequestData(this.exportName, this.#wantContexts),
      );
      if (final.type === NBD_REP.ACK) {
        for (const r of replies) {
          if (r.type !== NBD_REP.META_CONTEXT) continue;
          const { id, name } = decodeRepMetaContext(r.data);
          this.#contexts.set(name, id);
          this.#contextNames.set(id, name);
        }
      } else if (NbdClient.#fatalOptionError(final.type) || final.type === NBD_REP.ERR_UNKNOWN) {
        throw this.#optionFailure(final);
      }
    }
    const { replies, final } = await this.#option(
      NBD_OPT.GO,
      encodeInfoRequestData(this.exportName, [NBD_INFO.BLOCK_SIZE]),
    );
    if (final.type === NBD_REP.ERR_UNSUP) {
      this.#contexts.clear();
      this.#contextNames.clear();
      await this.#exportNameFallback(noZeroes);
      return;
    }
    if (final.type !== NBD_REP.ACK) throw this.#optionFailure(final);
    let sawExport = false;
    for (const r of replies) {
      if (r.type !== NBD_REP.INFO) continue;
      const info = decodeRepInfo(r.data);
      if ("unknown" in info) continue;
      if (info.type === NBD_INFO.EXPORT) {
        sawExport = true;
        this.#size = info.size;
        this.#tflags = info.transmissionFlags;
      } else if (info.type === NBD_INFO.BLOCK_SIZE) {
        this.#setBlockSize(info.minimum, info.preferred, info.maximum);
      }
    }
    if (!sawExport)
      throw new NbdProtocolError("UNEXPECTED", "NBD_OPT_GO acknowledged without NBD_INFO_EXPORT");
    this.#enterTransmission();
  }

  /** Runs the TLS handshake over the current socket and moves the receive path onto the TLS socket. */
  async #startTls(options: NonNullable<NbdClientOptions["tls"]>): Promise<void> {
    if (this.#parser.buffered > 0)
      throw new NbdProtocolError("UNEXPECTED", "server sent data after acknowledging STARTTLS");
    const hostname = options.hostname ?? (this.#server.type === "inet" ? this.#server.host : undefined);
    const tlsOptions = options.creds.clientOptions(hostname);
    const raw = this.#socket;
    raw.off("data", this.#onSocketData);
    raw.off("error", this.#onSocketError);
    raw.off("close", this.#onSocketClose);
    // The raw socket's own failures now surface through the TLS socket.
    raw.on("error", () => {});
    const t: TLSSocket = tlsConnect({ ...tlsOptions, socket: raw });
    this.#socket = t;
    await new Promise<void>((resolve, reject) => {
      const onError = (e: Error): void => {
        t.off("secureConnect", onSecure);
        t.off("close", onClose);
        reject(tlsHandshakeError(e));
      };
      const onClose = (): void => {
        t.off("secureConnect", onSecure);
        t.off("error", onError);
        reject(this.#failed ?? tlsHandshakeError(new Error("The TLS connection was closed")));
      };
      const onSecure = (): void => {
        t.off("error", onError);
        t.off("close", onClose);
        resolve();
      };
      t.once("error", onError);
      t.once("close", onClose);
      t.once("secureConnect", onSecure);
    });
    this.#socketClosed = this.#listen(t);
    this.#encrypted = true;
  }

  #setBlockSize(minimum: number, preferred: number, maximum: number): void {
    if (!isPow2(minimum) || minimum > 65536) {
      throw new NbdProtocolError(
        "BAD_VALUE",
        `minimum block size ${minimum} is not a power of 2 up to 65536`,
      );
    }
    if (!isPow2(preferred) || preferred < minimum) {
      throw new NbdProtocolError(
        "BAD_VALUE",
        `preferred block size ${preferred} is not a power of 2 ≥ ${minimum}`,
      );
    }
    if (maximum < minimum) {
      throw new NbdProtocolError(
        "BAD_VALUE",
        `maximum payload ${maximum} is below the minimum block ${minimum}`,
      );
    }
    this.#minBlock = minimum;
    this.#preferredBlock = preferred;
    this.#maxBlock = maximum;
  }

  async #exportNameFallback(noZeroes: boolean): Promise<void> {
    this.#usedGo = false;
    this.#send(encodeOption(NBD_OPT.EXPORT_NAME, encodeString(this.exportName, "export name")));
    this.#parser.expectExportNameReply(noZeroes);
    const m = await this.#recv();
    if (m.kind !== "export-name-reply") {
      throw new NbdProtocolError("UNEXPECTED", `expected the export-name reply, got ${m.kind}`);
    }
    this.#size = m.size;
    this.#tflags = m.transmissionFlags;
    this.#enterTransmission();
  }

  #enterTransmission(): void {
    if (this.#parser.failed === undefined && this.#usedGo) this.#parser.enterTransmission();
    this.#maxPayload = alignDown(Math.min(this.#maxBlock, NBD_MAX_PAYLOAD), this.#minBlock);
    this.#phase = "transmission";
    clearTimeout(this.#watchdog);
    this.#watchdog = undefined;
    if (this.#requestTimeoutMs > 0) {
      this.#watchdog = setTimeout(() => this.#onWatchdog(), this.#requestTimeoutMs);
      this.#watchdog.unref();
    }
    this.#pump();
  }

  /** Soft disconnect during the handshake (`NBD_OPT_ABORT`), when the stream is still sane. */
  #abort(): void {
    if (this.#phase !== "handshake" || this.#failed !== undefined || this.#parser.failed !== undefined)
      return;
    try {
      this.#socket.end(encodeOption(NBD_OPT.ABORT));
    } catch {
      // the socket is gone already
    }
  }

  // ---- receive path ------------------------------------------------------------------------------------

  #onData(chunk: Buffer): void {
    if (this.#failed !== undefined) return;
    this.#watchdog?.refresh();
    try {
      this.#parser.push(chunk);
    } catch (e) {
      this.#protocolFailure(e);
      return;
    }
    if (this.#phase === "handshake") this.#wakeHandshake();
    else this.#pump();
  }

  #pump(): void {
    try {
      for (let m = this.#parser.next(); m !== undefined; m = this.#parser.next()) {
        this.#dispatch(m);
        if (this.#failed !== undefined) return;
      }
    } catch (e) {
      this.#protocolFailure(e);
    }
  }

  #protocolFailure(e: unknown): void {
    const why = e instanceof Error ? e.message : String(e);
    this.#fail(connectionLost(`NBD protocol error: ${why}`, e));
  }

  #dispatch(m: NbdServerMessage): void {
    if (m.kind === "simple-reply") {
      const p = this.#take(m.cookie);
      if (m.error !== 0) {
        this.#settle(p, requestError(m.error, ""));
        return;
      }
      if (p.type === NBD_CMD.READ && p.buf !== undefined && m.data !== undefined) p.buf.set(m.data);
      this.#settle(p, undefined);
      return;
    }
    if (m.kind !== "chunk") throw new NbdProtocolError("UNEXPECTED", `unexpected ${m.kind} in transmission`);
    if (!this.#structured)
      throw new NbdProtocolError("UNEXPECTED", "structured reply chunk without negotiation");
    const p = this.#pending.get(m.cookie);
    if (p === undefined)
      throw new NbdProtocolError("BAD_VALUE", `reply chunk for unknown cookie ${m.cookie}`);
    const done = (m.flags & NBD_REPLY_FLAG_DONE) !== 0;
    if ((m.type & NBD_REPLY_TYPE_ERROR_BIT) !== 0) {
      const ec = decodeErrorChunk(m.type, m.payload);
      if (ec.error === 0) throw new NbdProtocolError("BAD_VALUE", "error chunk with error value 0");
      p.error ??= requestError(ec.error, ec.message, ec.offset);
    } else {
      switch (m.type) {
        case NBD_REPLY_TYPE.NONE:
          if (!done || m.payload.length !== 0) {
            throw new NbdProtocolError("BAD_VALUE", "NBD_REPLY_TYPE_NONE must be empty and final");
          }
          break;
        case NBD_REPLY_TYPE.OFFSET_DATA: {
          const { offset, data } = decodeOffsetData(m.payload);
          this.#readChunk(p, offset, data.length).set(data, offset - p.offset);
          break;
        }
        case NBD_REPLY_TYPE.OFFSET_HOLE: {
          const { offset, size } = decodeOffsetHole(m.payload);
          this.#readChunk(p, offset, size).fill(0, offset - p.offset, offset - p.offset + size);
          break;
        }
        case NBD_REPLY_TYPE.BLOCK_STATUS: {
          if (p.type !== NBD_CMD.BLOCK_STATUS || p.status === undefined) {
            throw new NbdProtocolError("UNEXPECTED", "block status chunk for another command");
          }
          const { contextId, extents } = decodeBlockStatus(m.payload);
          const name = this.#contextNames.get(contextId);
          if (name === undefined)
            throw new NbdProtocolError("BAD_VALUE", `block status for unknown context ${contextId}`);
          const out: NbdStatusExtent[] = [];
          let off = p.offset;
          for (const e of extents) {
            if (e.length === 0) throw new NbdProtocolError("BAD_VALUE", "block status extent of length 0");
            out.push({ offset: off, length: e.length, flags: e.flags });
            off += e.length;
          }
          p.status.set(name, out);
          break;
        }
        default:
          throw new NbdProtocolError("BAD_VALUE", `unknown reply chunk type ${m.type}`);
      }
    }
    if (!done) return;
    this.#pending.delete(p.cookie);
    if (p.error !== undefined) {
      this.#settle(p, p.error);
    } else if (p.type === NBD_CMD.READ && p.covered !== p.length) {
      this.#settle(p, new BlkError("EIO", `NBD server answered ${p.covered} of ${p.length} bytes of a read`));
    } else if (p.type === NBD_CMD.BLOCK_STATUS && p.status?.size === 0) {
      this.#settle(p, new BlkError("EIO", "NBD server sent no block status"));
    } else {
      this.#settle(p, undefined);
    }
  }

  /** Checks a READ content chunk against the request and returns the destination buffer. */
  #readChunk(p: Pending, offset: number, length: number): Uint8Array {
    if (p.type !== NBD_CMD.READ || p.buf === undefined) {
      throw new NbdProtocolError("UNEXPECTED", "read data chunk for another command");
    }
    if (offset < p.offset || offset + length > p.offset + p.length) {
      throw new NbdProtocolError(
        "BAD_VALUE",
        `read chunk ${offset}+${length} outside the request ${p.offset}+${p.length}`,
      );
    }
    p.covered += length;
    return p.buf;
  }

  #take(cookie: bigint): Pending {
    const p = this.#pending.get(cookie);
    if (p === undefined) throw new NbdProtocolError("BAD_VALUE", `reply for unknown cookie ${cookie}`);
    this.#pending.delete(cookie);
    return p;
  }

  #settle(p: Pending, error: Error | undefined): void {
    if (error === undefined) p.resolve();
    else p.reject(error);
    if (error instanceof BlkError && error.code === "ESHUTDOWN") {
      // The server is going away: no new requests, disconnect once the pending ones are answered.
      this.#shutdown ??= error;
      void this.close();
    }
  }

  #onWatchdog(): void {
    if (this.#pending.size === 0) return;
    this.#fail(new BlkError("ETIMEDOUT", `NBD server did not answer within ${this.#requestTimeoutMs} ms`));
  }

  /** The connection is dead: reject everything, release everyone, drop the socket. Idempotent. */
  #fail(error: BlkError): void {
    if (this.#failed !== undefined) return;
    this.#failed = error;
    this.#phase = "closed";
    clearTimeout(this.#watchdog);
    this.#watchdog = undefined;
    const w = this.#waiter;
    this.#waiter = undefined;
    w?.reject(error);
    const pending = [...this.#pending.values()];
    this.#pending.clear();
    for (const p of pending) p.reject(error);
    for (const s of this.#slots.splice(0)) s(false);
    this.#releaseDrain();
    this.#checkIdle();
    this.#socket.destroy();
  }

  // ---- request path ------------------------------------------------------------------------------------

  #check(): void {
    if (this.#failed !== undefined) throw this.#failed;
    if (this.#closing !== undefined) {
      throw this.#shutdown ?? new BlkError("ESHUTDOWN", "NBD client is closed");
    }
  }

  /** Takes one of the `maxInFlight` slots, waiting in FIFO order when all are taken. */
  async #acquire(): Promise<void> {
    this.#check();
    if (this.#reserved < this.#maxInFlight) {
      this.#reserved++;
      return;
    }
    const handed = await new Promise<boolean>((resolve) => this.#slots.push(resolve));
    if (!handed) throw this.#failed ?? new BlkError("ESHUTDOWN", "NBD client is closed");
  }

  /** Gives the slot to the next waiter (the count stays), or frees it. */
  #release(): void {
    const next = this.#slots.shift();
    if (next !== undefined) next(true);
    else this.#reserved--;
    this.#checkIdle();
  }

  #checkIdle(): void {
    if (this.#reserved === 0 && this.#pending.size === 0 && this.#slots.length === 0) {
      for (const r of this.#idle.splice(0)) r();
    }
  }

  /** Sends one request (≤ limits) and waits for its reply. */
  async #request(
    type: number,
    flags: number,
    offset: number,
    length: number,
    io: { data?: Uint8Array; buf?: Uint8Array; status?: Map<string, NbdStatusExtent[]> } = {},
  ): Promise<void> {
    await this.#acquire();
    try {
      while (this.#drain !== undefined) await this.#drain;
      if (this.#failed !== undefined) throw this.#failed;
      const cookie = BigInt(++this.#cookieSeq);
      const done = new Promise<void>((resolve, reject) => {
        this.#pending.set(cookie, {
          cookie,
          type,
          offset,
          length,
          buf: io.buf,
          covered: 0,
          status: io.status,
          error: undefined,
          resolve,
          reject,
        });
      });
      done.catch(() => {});
      if (this.#pending.size === 1) this.#watchdog?.refresh();
      this.#send(encodeRequest({ flags, type, cookie, offset, length }));
      if (io.data !== undefined) this.#send(io.data);
      await done;
    } finally {
      this.#release();
    }
  }

  #checkRange(what: string, offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
      throw new BlkError("EINVAL", `Invalid ${what} request ${offset}+${length}`);
    }
    if (offset + length > this.#size) {
      throw new BlkError(
        "EINVAL",
        `${what} request ${offset}+${length} beyond the end of the export (${this.#size})`,
        {
          offset,
        },
      );
    }
    if (offset % this.#minBlock !== 0 || length % this.#minBlock !== 0) {
      throw new BlkError(
        "EINVAL",
        `${what} request ${offset}+${length} is not aligned to the minimum block size ${this.#minBlock}`,
        { offset },
      );
    }
  }

  #checkWritable(what: string): void {
    if (this.readOnly) throw new BlkError("EPERM", `Cannot ${what}: the NBD export is read-only`);
  }

  #fuaFlag(fua: boolean | undefined): number {
    if (fua !== true) return 0;
    if (!this.canFua) throw new BlkError("ENOTSUP", "NBD server does not support FUA");
    return NBD_CMD_FLAG.FUA;
  }

  /** Runs `one(offset, length, index)` over `[offset, offset+length)` in pieces of `max`, all settled. */
  async #split(
    offset: number,
    length: number,
    max: number,
    one: (off: number, len: number, at: number) => Promise<void>,
  ): Promise<void> {
    if (length <= max) {
      await one(offset, length, 0);
      return;
    }
    const parts: Promise<void>[] = [];
    for (let at = 0; at < length; at += max) parts.push(one(offset + at, Math.min(max, length - at), at));
    const results = await Promise.allSettled(parts);
    for (const r of results) if (r.status === "rejected") throw r.reason;
  }

  /**
   * Reads `length` bytes at `offset` into a new buffer.
   * @throws {BlkError} EINVAL for a bad/unaligned range; the server's error; EIO when the connection dies
   */
  async read(offset: number, length: number, flags: NbdReadFlags = {}): Promise<Uint8Array> {
    this.#check();
    this.#checkRange("read", offset, length);
    const buf = new Uint8Array(length);
    await this.readInto(offset, buf, flags);
    return buf;
  }

  /** Reads `buf.length` bytes at `offset` into `buf` (split at {@link NbdClient.maxPayload}, pipelined). */
  async readInto(offset: number, buf: Uint8Array, flags: NbdReadFlags = {}): Promise<void> {
    this.#check();
    this.#checkRange("read", offset, buf.length);
    if (buf.length === 0) return;
    let f = 0;
    if (flags.df === true) {
      if (!this.canDf) throw new BlkError("ENOTSUP", "NBD server does not support the DF flag");
      f |= NBD_CMD_FLAG.DF;
    }
    await this.#split(offset, buf.length, this.#maxPayload, (off, len, at) =>
      this.#request(NBD_CMD.READ, f, off, len, { buf: buf.subarray(at, at + len) }),
    );
  }

  /** Writes `data` at `offset` (split at {@link NbdClient.maxPayload}, pipelined). */
  async write(offset: number, data: Uint8Array, flags: NbdFuaFlags = {}): Promise<void> {
    this.#check();
    this.#checkWritable("write");
    this.#checkRange("write", offset, data.length);
    const f = this.#fuaFlag(flags.fua);
    if (data.length === 0) return;
    await this.#split(offset, data.length, this.#maxPayload, (off, len, at) =>
      this.#request(NBD_CMD.WRITE, f, off, len, { data: data.subarray(at, at + len) }),
    );
  }

  /** `NBD_CMD_FLUSH`: every write answered so far is durable. @throws {BlkError} ENOTSUP without SEND_FLUSH */
  async flush(): Promise<void> {
    this.#check();
    if (!this.canFlush) throw new BlkError("ENOTSUP", "NBD server does not support flush");
    await this.#request(NBD_CMD.FLUSH, 0, 0, 0);
  }

  /** `NBD_CMD_TRIM` (a hint). @throws {BlkError} ENOTSUP without SEND_TRIM */
  async trim(offset: number, length: number, flags: NbdFuaFlags = {}): Promise<void> {
    this.#check();
    this.#checkWritable("trim");
    if (!this.canTrim) throw new BlkError("ENOTSUP", "NBD server does not support trim");
    this.#checkRange("trim", offset, length);
    const f = this.#fuaFlag(flags.fua);
    if (length === 0) return;
    await this.#split(offset, length, alignDown(MAX_NO_PAYLOAD, this.#minBlock), (off, len) =>
      this.#request(NBD_CMD.TRIM, f, off, len),
    );
  }

  /**
   * `NBD_CMD_WRITE_ZEROES` (may punch holes unless `noHole`).
   * @throws {BlkError} ENOTSUP without SEND_WRITE_ZEROES (or SEND_FAST_ZERO for `fastZero`), and from the
   * server for a `fastZero` request it cannot do quickly
   */
  async writeZeroes(offset: number, length: number, flags: NbdZeroFlags = {}): Promise<void> {
    this.#check();
    this.#checkWritable("write zeroes");
    if (!this.canZero) throw new BlkError("ENOTSUP", "NBD server does not support write zeroes");
    this.#checkRange("write zeroes", offset, length);
    let f = this.#fuaFlag(flags.fua);
    if (flags.noHole === true) f |= NBD_CMD_FLAG.NO_HOLE;
    if (flags.fastZero === true) {
      if (!this.canFastZero) throw new BlkError("ENOTSUP", "NBD server does not support fast zero");
      f |= NBD_CMD_FLAG.FAST_ZERO;
    }
    if (length === 0) return;
    await this.#split(offset, length, alignDown(MAX_NO_PAYLOAD, this.#minBlock), (off, len) =>
      this.#request(NBD_CMD.WRITE_ZEROES, f, off, len),
    );
  }

  /**
   * `NBD_CMD_BLOCK_STATUS` over `[offset, offset+length)` (clamped to 1 GiB): extents per selected context.
   * The server may describe less than asked (at least one extent) and the last extent may overshoot.
   * @throws {BlkError} ENOTSUP when no context was negotiated
   */
  async blockStatus(
    offset: number,
    length: number,
    flags: NbdBlockStatusFlags = {},
  ): Promise<Map<string, NbdStatusExtent[]>> {
    this.#check();
    if (!this.canBlockStatus) throw new BlkError("ENOTSUP", "NBD server offers no block status context");
    this.#checkRange("block status", offset, length);
    const status = new Map<string, NbdStatusExtent[]>();
    if (length === 0) return status;
    const len = Math.min(length, alignDown(MAX_NO_PAYLOAD, this.#minBlock));
    await this.#request(NBD_CMD.BLOCK_STATUS, flags.reqOne === true ? NBD_CMD_FLAG.REQ_ONE : 0, offset, len, {
      status,
    });
    return status;
  }

  // ---- close -------------------------------------------------------------------------------------------

  /**
   * Waits for the requests in flight, sends `NBD_CMD_DISC` and closes the socket. Idempotent: every call
   * returns the same promise. Requests issued after `close()` fail with ESHUTDOWN.
   */
  close(): Promise<void> {
    this.#closing ??= (async () => {
      await new Promise<void>((resolve) => {
        this.#idle.push(resolve);
        this.#checkIdle();
      });
      if (this.#failed === undefined && this.#phase === "transmission") {
        this.#phase = "closed";
        clearTimeout(this.#watchdog);
        this.#watchdog = undefined;
        const disc = encodeRequest({
          flags: 0,
          type: NBD_CMD.DISC,
          cookie: BigInt(++this.#cookieSeq),
          offset: 0,
          length: 0,
        });
        this.#socket.end(disc);
        const t = setTimeout(() => this.#socket.destroy(), 5000);
        t.unref();
        await this.#socketClosed;
        clearTimeout(t);
      } else {
        this.#socket.destroy();
        await this.#socketClosed;
      }
    })();
    return this.#closing;
  }

  /** `close()`. */
  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}
