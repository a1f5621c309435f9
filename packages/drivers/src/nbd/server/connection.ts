/**
 * One client connection of an {@link NbdServer}: the fixed-newstyle handshake, then transmission with
 * requests dispatched concurrently (replies leave in completion order), a bounded number in flight, and
 * backpressure: the socket is paused while the in-flight queue is full or its write buffer is over its
 * high-water mark. Protocol violations hard-disconnect; request failures become NBD errors.
 *
 * Sockets from the server's own listener (without TLS) are adopted: they read into the server's shared
 * read buffer, whose unparsed rest the parser copies out before the read callback returns, and the
 * rest of a large WRITE payload straight into its pooled buffer. No received byte then costs an
 * allocation, and a payload buffer goes back to the pool only once the node write using it succeeded.
 */
import { Socket, type SocketConstructorOpts } from "node:net";
import { createServer as createTlsServer, type TLSSocket } from "node:tls";
import { isBlkError } from "@blk/core";
import {
  commandName,
  NBD_CHUNK_HEADER_SIZE,
  NBD_CMD,
  NBD_CMD_FLAG,
  NBD_ERR,
  NBD_FLAG,
  NBD_FLAG_C,
  NBD_INFO,
  NBD_OPT,
  NBD_REP,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE,
  NBD_SIMPLE_REPLY_SIZE,
  optionName,
} from "../protocol/constants.ts";
import { decodeInfoRequest, decodeMetaContextRequest, nbdErrno } from "../protocol/decode.ts";
import {
  encodeBlockStatusChunk,
  encodeChunk,
  encodeErrorChunk,
  encodeExportNameReply,
  encodeGreeting,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoString,
  encodeOffsetDataHeaderInto,
  encodeOffsetHole,
  encodeOptionError,
  encodeOptionReply,
  encodeRepMetaContext,
  encodeRepServer,
  encodeSimpleReply,
  encodeSimpleReplyInto,
} from "../protocol/encode.ts";
import { NbdProtocolError } from "../protocol/errors.ts";
import { type NbdClientMessage, NbdClientStreamParser, type NbdRequest } from "../protocol/parser.ts";
import type { TlsCreds } from "../tls.ts";
import type { NbdExport, NbdMetaContext } from "./export.ts";
import type { BufferPool } from "./pool.ts";

/** What a connection needs from its server. */
export interface NbdConnectionHost {
  findExport(name: string): NbdExport | undefined;
  exportList(): readonly NbdExport[];
  readonly maxInFlight: number;
  readonly maxOptions: number;
  readonly handshakeTimeoutMs: number;
  /** Where READ data and gathered WRITE payloads are allocated. */
  readonly bufferPool: BufferPool;
  /**
   * What adopted sockets read into (shared: its bytes are parsed or copied before the read callback
   * returns, and the event loop runs one read callback at a time).
   */
  readonly readBuffer: Uint8Array;
  /** TLS credentials; with `required`, every option but STARTTLS and ABORT needs TLS first. */
  readonly tls: { creds: TlsCreds; required: boolean } | undefined;
  /** The server is shutting down: options other than ABORT get `NBD_REP_ERR_SHUTDOWN`. */
  readonly shuttingDown: boolean;
  log(message: string): void;
  closed(conn: NbdConnection): void;
}

/** Counters and state of a connection (for monitoring and tests). */
export interface NbdConnectionInfo {
  phase: "handshake" | "transmission" | "closed";
  export: string | undefined;
  structured: boolean;
  /** STARTTLS succeeded: the connection is encrypted. */
  tls: boolean;
  inFlight: number;
  /** Bytes queued in the socket's write buffer. */
  writeBuffered: number;
  /** Bytes received and not yet parsed. */
  readBuffered: number;
  requests: number;
}

/** A request refused before it reached the node: answered with `errno`, the connection carries on. */
class RequestError extends Error {
  readonly errno: number;
  constructor(errno: number, message: string) {
    super(message);
    this.errno = errno;
  }
}

const DF_VALID = NBD_CMD_FLAG.DF;
/** Bytes of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk in front of its data. */
const OFFSET_DATA_HEADER_SIZE = NBD_CHUNK_HEADER_SIZE + 8;
const ZERO_VALID = NBD_CMD_FLAG.NO_HOLE | NBD_CMD_FLAG.FAST_ZERO;
/** Bytes of a WRITE payload still missing for the socket to read straight into it (less: the read buffer). */
const DIRECT_READ_MIN = 16 * 1024;
/**
 * WRITE payloads up to this size get their buffer as soon as their header is parsed (QEMU does so for
 * every size), so that the socket reads the rest straight into it; larger ones once a quarter arrived.
 * A client that sends headers and no data thus makes a connection hold at most this much.
 */
const EAGER_PAYLOAD = 1024 * 1024;
/**
 * How much an adopted socket reads after a large WRITE: the next request's header and not much of its
 * payload, whose rest then goes straight into the payload buffer (instead of being copied out of the read
 * buffer). After other requests, reads take as much as the read buffer holds (many small requests).
 */
const HEADER_READ_SIZE = 4096;
/** Bytes of replies an adopted socket buffers before the connection stops starting requests. */
const WRITE_HIGH_WATER_MARK = 256 * 1024;

type OnRead = { buffer: () => Uint8Array; callback: (n: number, buf: Uint8Array) => void };

/**
 * Re-creates a socket the server accepted paused (`pauseOnConnect`) around the same handle with `onread`,
 * so that received bytes land in buffers the connection chooses instead of a new 64 KiB ArrayBuffer per
 * read: under a stream of WRITE payloads those allocations (external memory) made V8 run a mark-compact
 * every few dozen megabytes. Node offers `onread` only to sockets it creates itself, hence the private
 * `_handle` (checked: undefined when Node changes it, and the socket is used as it is).
 */
function adoptSocket(s: Socket, onread: OnRead): Socket | undefined {
  const internal = s as unknown as { _handle?: { useUserBuffer?: unknown } | null };
  const handle = internal._handle;
  if (handle == null || typeof handle.useUserBuffer !== "function" || s.readableLength > 0 || s.destroyed) {
    return undefined;
  }
  internal._handle = null;
  s.destroy(); // the wrapper alone: without a handle nothing is closed
  return new Socket({
    handle,
    allowHalfOpen: true,
    onread,
    // Room for a loop iteration's worth of small replies (16 × 4 KiB reads) while the socket is corked.
    writableHighWaterMark: WRITE_HIGH_WATER_MARK,
  } as SocketConstructorOpts);
}
/** A client connection. Created by the server for each accepted socket. */
export class NbdConnection {
  readonly host: NbdConnectionHost;
  #socket: Socket;
  #tls = false;
  /** Between the STARTTLS reply and the end of the TLS handshake: nothing is read. */
  #upgrading = false;
  #parser: NbdClientStreamParser;
  #phase: "handshake" | "transmission" | "closed" = "handshake";
  #fixed = false;
  #noZeroes = false;
  #structured = false;
  #export: NbdExport | undefined;
  #meta: { exp: NbdExport; contexts: NbdMetaContext[] } | undefined;
  #options = 0;
  #inFlight = 0;
  #requests = 0;
  #writeBlocked = false;
  /** The socket corked by {@link NbdConnection.#write} until the check phase. */
  #corked: Socket | undefined;
  #paused = false;
  #disconnecting = false;
  #eof = false;
  #timer: NodeJS.Timeout | undefined;
  #idle: (() => void)[] = [];
  /** The WRITE payload space the socket was last given to read into (adopted sockets). */
  #direct: Uint8Array | undefined;
  /** The last request was a WRITE large enough to be read straight into its payload. */
  #largeWrites = false;

  /**
   * `adopt`: the socket was accepted paused from the server's own listener and may be re-created to read
   * into the connection's buffers (see {@link NbdConnectionHost.readBuffer}).
   */
  constructor(host: NbdConnectionHost, socket: Socket, adopt = false) {
    this.host = host;
    const pool = host.bufferPool;
    this.#parser = new NbdClientStreamParser({
      allocatePayload: (n) => pool.acquire(n),
      eagerPayload: EAGER_PAYLOAD,
      holdTransient: { allocate: (n) => pool.acquire(n), release: (b) => pool.release(b) },
    });
    if (adopt) {
      const adopted = adoptSocket(socket, { buffer: this.#nextReadBuffer, callback: this.#onRead });
      if (adopted === undefined) socket.resume();
      else socket = adopted;
    }
    this.#socket = socket;
    socket.on("error", (e) => this.host.log(`connection error: ${e.message}`));
    this.#listen(socket);
    if (host.handshakeTimeoutMs > 0) {
      this.#timer = setTimeout(() => {
        this.host.log("handshake timed out");
        this.destroy();
      }, host.handshakeTimeoutMs);
      this.#timer.unref();
    }
    this.#write([encodeGreeting(NBD_FLAG.FIXED_NEWSTYLE | NBD_FLAG.NO_ZEROES)]);
  }

  /** The socket the connection talks over (a `TLSSocket` after STARTTLS). */
  get socket(): Socket {
    return this.#socket;
  }

  #onDrain = (): void => {
    this.#writeBlocked = false;
    this.#pump();
  };
  #onEnd = (): void => {
    // The client half-closed: answer what it sent, then close.
    this.#eof = true;
    this.#pump();
  };
  #onSocketData = (chunk: Buffer): void => this.#onData(chunk, false);
  /** Adopted sockets: where the next read goes, straight into a WRITE payload when one is being gathered. */
  #nextReadBuffer = (): Uint8Array => {
    const space = this.#parser.payloadSpace(DIRECT_READ_MIN);
    this.#direct = space;
    if (space !== undefined) return space;
    const b = this.host.readBuffer;
    return this.#largeWrites && this.#parser.payloadPending === 0 ? b.subarray(0, HEADER_READ_SIZE) : b;
  };
  /** Adopted sockets: `n` bytes were read into `buf` (reused once this returns). */
  #onRead = (n: number, buf: Uint8Array): void => {
    if (buf !== this.#direct) {
      this.#onData(buf.subarray(0, n), true);
      return;
    }
    this.#direct = undefined;
    if (this.#phase === "closed" || this.#disconnecting || this.#upgrading) return;
    try {
      this.#parser.payloadFilled(n);
    } catch (e) {
      this.#protocolError(e);
      return;
    }
    this.#pump();
  };
  #onSocketClose = (): void => this.#onClose();

  #listen(s: Socket): void {
    s.on("data", this.#onSocketData);
    s.on("drain", this.#onDrain);
    s.on("end", this.#onEnd);
    s.on("close", this.#onSocketClose);
  }

  /** Stops reading `s` (its `close` still ends the connection). */
  #unlisten(s: Socket): void {
    s.off("data", this.#onSocketData);
    s.off("drain", this.#onDrain);
    s.off("end", this.#onEnd);
  }

  /** The export in use once transmission started. */
  get export(): NbdExport | undefined {
    return this.#export;
  }

  /** State and counters. */
  info(): NbdConnectionInfo {
    return {
      phase: this.#phase,
      export: this.#export?.name,
      structured: this.#structured,
      tls: this.#tls,
      inFlight: this.#inFlight,
      writeBuffered: this.socket.writableLength,
      readBuffered: this.#parser.buffered,
      requests: this.#requests,
    };
  }

  /** False once the client disconnected (or sent DISC/ABORT) or was dropped. */
  get active(): boolean {
    return this.#phase !== "closed" && !this.#disconnecting;
  }

  /** Resolves once no request is in flight. */
  idle(): Promise<void> {
    if (this.#inFlight === 0) return Promise.resolve();
    return new Promise((r) => this.#idle.push(r));
  }

  /** Hard-disconnects now (in-flight requests finish; their replies are dropped). */
  destroy(): void {
    this.#socket.destroy();
    this.#onClose();
  }

  #onClose(): void {
    if (this.#phase === "closed") return;
    this.#phase = "closed";
    if (this.#timer !== undefined) clearTimeout(this.#timer);
    this.host.closed(this);
  }

  /** `transient`: `chunk` is the shared read buffer, whose unparsed rest the parser copies before returning. */
  #onData(chunk: Uint8Array, transient: boolean): void {
    if (this.#phase === "closed" || this.#disconnecting || this.#upgrading) return;
    try {
      if (transient) this.#parser.pushTransient(chunk);
      else this.#parser.push(chunk);
    } catch (e) {
      this.#protocolError(e);
      return;
    }
    try {
      this.#pump();
    } finally {
      if (transient) this.#parser.settle();
    }
  }

  #protocolError(e: unknown): void {
    this.host.log(`dropping client: ${e instanceof Error ? e.message : String(e)}`);
    this.destroy();
  }

  /** Processes buffered messages while limits allow; pauses the socket when they do not. */
  #pump(): void {
    while (this.#phase !== "closed" && !this.#disconnecting && !this.#upgrading) {
      if (this.#writeBlocked || (this.#phase === "transmission" && this.#inFlight >= this.host.maxInFlight)) {
        if (!this.#paused) {
          this.#paused = true;
          this.socket.pause();
        }
        return;
      }
      let m: NbdClientMessage | undefined;
      try {
        m = this.#parser.next();
      } catch (e) {
        this.#protocolError(e);
        return;
      }
      if (m === undefined) {
        if (this.#eof) {
          this.#disconnecting = true;
          this.#maybeFinish();
          return;
        }
        break;
      }
      this.#dispatch(m);
    }
    if (this.#paused && this.#phase !== "closed" && !this.#upgrading) {
      this.#paused = false;
      this.socket.resume();
    }
  }

  /**
   * Writes `bufs` in order; `done` runs once the socket no longer needs them (or never took them). The
   * socket stays corked until the event loop's check phase: the replies of the requests that finished in
   * this loop iteration leave in one system call (and wake the client once), up to the socket's high-water
   * mark, beyond which no request is started until it drained.
   */
  #write(bufs: readonly Uint8Array[], done?: () => void): void {
    const s = this.socket;
    if (s.destroyed || !s.writable) {
      done?.();
      return;
    }
    if (this.#corked !== s) {
      if (this.#corked === undefined) setImmediate(this.#uncork);
      else this.#corked.uncork(); // the socket was replaced (STARTTLS): the old one is done with
      this.#corked = s;
      s.cork();
    }
    const n = bufs.length;
    let ok = true;
    for (let i = 0; i < n; i++) {
      const b = bufs[i] as Uint8Array;
      // Stream callbacks run in order: the last chunk's runs once every chunk before it was written too.
      ok = i === n - 1 && done !== undefined ? s.write(b, done) : s.write(b);
    }
    if (!ok || s.writableNeedDrain) this.#writeBlocked = true;
  }

  #uncork = (): void => {
    const s = this.#corked;
    this.#corked = undefined;
    if (s === undefined) return;
    s.uncork();
  };

  #dispatch(m: NbdClientMessage): void {
    switch (m.kind) {
      case "client-flags":
        this.#clientFlags(m.flags);
        return;
      case "option-too-big":
        this.#countOption();
        if (m.option === NBD_OPT.EXPORT_NAME || !this.#fixed) {
          // No reply is possible to EXPORT_NAME (or to a client without fixed newstyle): close.
          this.destroy();
          return;
        }
        this.#write([
          encodeOptionError(m.option, NBD_REP.ERR_TOO_BIG, `option of ${m.length} bytes is too long`),
        ]);
        return;
      case "option":
        this.#countOption();
        if (this.#phase === "handshake") this.#option(m.option, m.data);
        return;
      case "request":
        this.#request(m);
        return;
    }
  }

  #countOption(): void {
    if (++this.#options > this.host.maxOptions) {
      this.#protocolError(new NbdProtocolError("TOO_BIG", `more than ${this.host.maxOptions} options`));
    }
  }

  #clientFlags(flags: number): void {
    const known = NBD_FLAG_C.FIXED_NEWSTYLE | NBD_FLAG_C.NO_ZEROES;
    if ((flags & ~known) !== 0) {
      this.#protocolError(new NbdProtocolError("BAD_FLAGS", `unknown client flags 0x${flags.toString(16)}`));
      return;
    }
    this.#fixed = (flags & NBD_FLAG_C.FIXED_NEWSTYLE) !== 0;
    this.#noZeroes = (flags & NBD_FLAG_C.NO_ZEROES) !== 0;
  }

  // ---- options ------------------------------------------------------------------------------------------

  #reply(option: number, type: number, data?: Uint8Array): void {
    this.#write([encodeOptionReply(option, type, data)]);
  }

  #error(option: number, type: number, message: string): void {
    this.#write([encodeOptionError(option, type, message)]);
  }

  #option(option: number, data: Uint8Array): void {
    if (option !== NBD_OPT.EXPORT_NAME && !this.#fixed) {
      // A non-fixed newstyle client cannot parse option replies: all we can do is close.
      this.#protocolError(
        new NbdProtocolError("UNEXPECTED", `option ${option} from a client without fixed newstyle`),
      );
      return;
    }
    if (this.host.shuttingDown && option !== NBD_OPT.ABORT) {
      if (option === NBD_OPT.EXPORT_NAME) this.destroy();
      else this.#error(option, NBD_REP.ERR_SHUTDOWN, "Server is shutting down");
      return;
    }
    if (
      this.host.tls?.required === true &&
      !this.#tls &&
      option !== NBD_OPT.STARTTLS &&
      option !== NBD_OPT.ABORT
    ) {
      // FORCEDTLS: nothing but STARTTLS and ABORT before TLS (EXPORT_NAME cannot be answered: close).
      if (option === NBD_OPT.EXPORT_NAME) this.destroy();
      else
        this.#error(option, NBD_REP.ERR_TLS_REQD, `Option 0x${option.toString(16)} not permitted before TLS`);
      return;
    }
    switch (option) {
      case NBD_OPT.EXPORT_NAME:
        this.#optExportName(data);
        return;
      case NBD_OPT.ABORT:
        this.#reply(option, NBD_REP.ACK);
        this.#disconnecting = true;
        this.socket.end();
        return;
      case NBD_OPT.LIST:
        if (data.length !== 0) {
          this.#error(option, NBD_REP.ERR_INVALID, "option 'list' has unexpected length");
          return;
        }
        for (const e of this.host.exportList())
          this.#write([encodeRepServer(option, e.name, e.description ?? "")]);
        this.#reply(option, NBD_REP.ACK);
        return;
      case NBD_OPT.STARTTLS:
        if (data.length !== 0) {
          this.#error(option, NBD_REP.ERR_INVALID, "option 'starttls' has unexpected length");
          if (this.host.tls !== undefined) {
            // As qemu-nbd with TLS: a client this confused about STARTTLS is hung up on.
            this.#disconnecting = true;
            this.socket.end();
          }
          return;
        }
        if (this.host.tls === undefined) {
          this.#error(option, NBD_REP.ERR_POLICY, "TLS not configured");
          return;
        }
        if (this.#tls) {
          this.#error(option, NBD_REP.ERR_INVALID, "TLS already enabled");
          return;
        }
        this.#startTls(this.host.tls.creds);
        return;
      case NBD_OPT.INFO:
      case NBD_OPT.GO:
        this.#optInfo(option, data);
        return;
      case NBD_OPT.STRUCTURED_REPLY:
        if (data.length !== 0) {
          this.#error(option, NBD_REP.ERR_INVALID, "option 'structured reply' has unexpected length");
          return;
        }
        if (this.#structured) {
          this.#error(option, NBD_REP.ERR_INVALID, "structured reply already negotiated");
          return;
        }
        this.#structured = true;
        this.#reply(option, NBD_REP.ACK);
        return;
      case NBD_OPT.LIST_META_CONTEXT:
      case NBD_OPT.SET_META_CONTEXT:
        this.#optMeta(option, data);
        return;
      default:
        this.#error(
          option,
          NBD_REP.ERR_UNSUP,
          `Unsupported option ${option} (${option <= NBD_OPT.SET_META_CONTEXT ? optionName(option) : "<unknown>"})`,
        );
        return;
    }
  }

  /**
   * Acknowledges STARTTLS and runs the TLS handshake on the same socket; option haggling then goes on
   * over TLS from a clean state (structured replies and metadata contexts are forgotten).
   */
  #startTls(creds: TlsCreds): void {
    if (this.#parser.buffered > 0) {
      // The client may not send anything before it read our ACK: what it sent is not TLS.
      this.#protocolError(new NbdProtocolError("UNEXPECTED", "data after NBD_OPT_STARTTLS"));
      return;
    }
    const raw = this.#socket;
    this.#upgrading = true;
    // Bytes arriving from now on are the TLS handshake: they stay in the socket for the TLS layer.
    this.#unlisten(raw);
    raw.pause();
    this.#write([encodeOptionReply(NBD_OPT.STARTTLS, NBD_REP.ACK)], () => {
      if (this.#phase === "closed") return;
      // A tls.Server (never listening) checks the peer's certificate chain, which a bare server-mode
      // TLSSocket does not do.
      const server = createTlsServer({
        ...creds.serverOptions(),
        ...(this.host.handshakeTimeoutMs > 0 ? { handshakeTimeout: this.host.handshakeTimeoutMs } : {}),
      });
      server.once("secureConnection", (t: TLSSocket) => {
        if (this.#phase === "closed") {
          t.destroy();
          return;
        }
        this.#socket = t;
        t.on("error", (e) => this.host.log(`connection error: ${e.message}`));
        this.#listen(t);
        this.#tls = true;
        this.#structured = false;
        this.#meta = undefined;
        this.#upgrading = false;
        this.#writeBlocked = false;
        this.#paused = false;
        this.#pump();
      });
      server.once("tlsClientError", (e: Error) => {
        this.host.log(`TLS handshake failed: ${e.message}`);
        this.destroy();
        raw.destroy();
      });
      server.emit("connection", raw);
    });
  }

  #startTransmission(exp: NbdExport): void {
    this.#export = exp;
    this.#phase = "transmission";
    if (this.#meta !== undefined && this.#meta.exp !== exp) this.#meta = undefined;
    if (this.#timer !== undefined) clearTimeout(this.#timer);
    this.#timer = undefined;
    this.#parser.enterTransmission();
    if (this.socket.remoteFamily !== undefined) this.socket.setNoDelay(true);
  }

  #optExportName(data: Uint8Array): void {
    let name: string;
    try {
      name = new TextDecoder("utf-8", { fatal: true }).decode(data);
    } catch {
      this.destroy();
      return;
    }
    const exp = this.host.findExport(name);
    if (exp === undefined) {
      // EXPORT_NAME cannot report errors: the only answer is to close.
      this.destroy();
      return;
    }
    this.#write([encodeExportNameReply(exp.size, exp.transmissionFlags(this.#structured), this.#noZeroes)]);
    this.#startTransmission(exp);
  }

  #optInfo(option: number, data: Uint8Array): void {
    let req: { name: string; infos: number[] };
    try {
      req = decodeInfoRequest(data);
    } catch (e) {
      this.#error(option, NBD_REP.ERR_INVALID, (e as Error).message);
      return;
    }
    const exp = this.host.findExport(req.name);
    if (exp === undefined) {
      this.#error(option, NBD_REP.ERR_UNKNOWN, `export '${req.name}' not present`);
      return;
    }
    const out: Uint8Array[] = [];
    const wants = (t: number): boolean => req.infos.includes(t);
    if (wants(NBD_INFO.NAME)) out.push(encodeInfoString(option, NBD_INFO.NAME, exp.name));
    if (exp.description !== undefined)
      out.push(encodeInfoString(option, NBD_INFO.DESCRIPTION, exp.description));
    if (option === NBD_OPT.INFO || wants(NBD_INFO.BLOCK_SIZE)) {
      out.push(encodeInfoBlockSize(option, exp.minBlock, exp.preferredBlock, exp.maxPayload));
    }
    out.push(encodeInfoExport(option, exp.size, exp.transmissionFlags(this.#structured)));
    out.push(encodeOptionReply(option, NBD_REP.ACK));
    this.#write(out);
    if (option === NBD_OPT.GO) this.#startTransmission(exp);
  }

  #optMeta(option: number, data: Uint8Array): void {
    const set = option === NBD_OPT.SET_META_CONTEXT;
    if (set) this.#meta = undefined; // SET replaces the selection even when it fails
    if (set && !this.#structured) {
      this.#error(
        option,
        NBD_REP.ERR_INVALID,
        "request option 'set meta context' when structured reply is not negotiated",
      );
      return;
    }
    let req: { name: string; queries: string[] };
    try {
      req = decodeMetaContextRequest(data);
    } catch (e) {
      this.#error(option, NBD_REP.ERR_INVALID, (e as Error).message);
      return;
    }
    const exp = this.host.findExport(req.name);
    if (exp === undefined) {
      this.#error(option, NBD_REP.ERR_UNKNOWN, `export '${req.name}' not present`);
      return;
    }
    let selected: NbdMetaContext[];
    if (!set && req.queries.length === 0) {
      selected = [...exp.contexts];
    } else {
      const chosen = new Set<NbdMetaContext>();
      for (const q of req.queries) for (const c of exp.matchContexts(q, !set)) chosen.add(c);
      selected = exp.contexts.filter((c) => chosen.has(c));
    }
    const out = selected.map((c) => encodeRepMetaContext(option, set ? c.id : 0, c.name));
    out.push(encodeOptionReply(option, NBD_REP.ACK));
    this.#write(out);
    if (set) this.#meta = { exp, contexts: selected };
  }

  // ---- transmission -------------------------------------------------------------------------------------

  #request(req: NbdRequest): void {
    this.#requests++;
    this.#largeWrites = req.type === NBD_CMD.WRITE && req.length >= DIRECT_READ_MIN;
    if (req.type === NBD_CMD.DISC) {
      this.#disconnecting = true;
      this.#maybeFinish();
      return;
    }
    this.#inFlight++;
    void this.#serve(req);
  }

  /** Runs a request and answers it (never rejects), then lets the next ones in. */
  async #serve(req: NbdRequest): Promise<void> {
    try {
      await this.#execute(req);
    } catch (e) {
      this.#sendError(req, e);
    }
    this.#inFlight--;
    if (this.#inFlight === 0) for (const w of this.#idle.splice(0)) w();
    if (this.#disconnecting) this.#maybeFinish();
    else this.#pump();
  }

  #maybeFinish(): void {
    if (this.#inFlight > 0 || this.#phase === "closed") return;
    this.socket.end();
  }

  #sendError(req: NbdRequest, e: unknown): void {
    let errno: number;
    let message: string;
    if (e instanceof RequestError) {
      errno = e.errno;
      message = e.message;
    } else if (isBlkError(e)) {
      errno = nbdErrno(e.code);
      message = e.message;
    } else {
      errno = NBD_ERR.EIO;
      message = e instanceof Error ? e.message : String(e);
      this.host.log(`request failed: ${message}`);
    }
    if (this.#structured) this.#write([encodeErrorChunk(NBD_REPLY_FLAG_DONE, req.cookie, errno, message)]);
    else this.#write([encodeSimpleReply(errno, req.cookie)]);
  }

  /**
   * Validates flags, permission and range. `kind`: `write` changes data (EPERM when read-only, ENOSPC
   * past the end, as the spec asks); `trim` changes data but is EINVAL past the end; others are EINVAL.
   */
  #check(
    req: NbdRequest,
    exp: NbdExport,
    validFlags: number,
    kind: "read" | "write" | "trim" | "none",
  ): void {
    const bad = req.flags & ~(validFlags | NBD_CMD_FLAG.FUA);
    if (bad !== 0) {
      throw new RequestError(
        NBD_ERR.EINVAL,
        `unsupported flags for command ${commandName(req.type)} (got 0x${req.flags.toString(16)})`,
      );
    }
    if ((kind === "write" || kind === "trim") && !exp.writable) {
      throw new RequestError(NBD_ERR.EPERM, "Export is read-only");
    }
    const size = exp.size;
    if (!Number.isSafeInteger(req.offset) || req.offset > size || req.length > size - req.offset) {
      throw new RequestError(
        kind === "write" ? NBD_ERR.ENOSPC : NBD_ERR.EINVAL,
        `operation past EOF; From: ${req.offset}, Len: ${req.length}, Size: ${size}`,
      );
    }
    const align = exp.minBlock;
    if (align > 1 && (req.offset % align !== 0 || req.length % align !== 0)) {
      throw new RequestError(NBD_ERR.EINVAL, `request not aligned to the minimum block size ${align}`);
    }
  }

  async #execute(req: NbdRequest): Promise<void> {
    const exp = this.#export;
    if (exp === undefined || exp.removed) throw new RequestError(NBD_ERR.ESHUTDOWN, "export removed");
    const edge = exp.edge;
    const fua = (req.flags & NBD_CMD_FLAG.FUA) !== 0;
    switch (req.type) {
      case NBD_CMD.READ: {
        this.#check(req, exp, this.#structured ? DF_VALID : 0, "read");
        if (req.length > exp.maxPayload) {
          throw new RequestError(
            NBD_ERR.EINVAL,
            `len (${req.length}) is larger than max len (${exp.maxPayload})`,
          );
        }
        await this.#read(req, exp, (req.flags & NBD_CMD_FLAG.DF) !== 0);
        return;
      }
      case NBD_CMD.WRITE: {
        const data = req.data ?? new Uint8Array(0);
        this.#check(req, exp, 0, "write");
        await edge.write(req.offset, data, { fua });
        // Back to the pool only after success: a failed request may leave I/O on the buffer behind it.
        this.host.bufferPool.release(data);
        this.#ok(req);
        return;
      }
      case NBD_CMD.FLUSH:
        this.#check(req, exp, 0, "none");
        await edge.flush();
        this.#ok(req);
        return;
      case NBD_CMD.TRIM:
        this.#check(req, exp, 0, "trim");
        if (req.length > 0) await edge.discard(req.offset, req.length);
        exp.forgetData(req.offset, req.length);
        if (fua) await edge.flush();
        this.#ok(req);
        return;
      case NBD_CMD.CACHE:
        // A prefetch hint: validated, nothing to do for an in-process node.
        this.#check(req, exp, 0, "read");
        this.#ok(req);
        return;
      case NBD_CMD.WRITE_ZEROES: {
        this.#check(req, exp, ZERO_VALID, "write");
        if (req.length > 0) {
          await edge.writeZeroes(req.offset, req.length, {
            mayUnmap: (req.flags & NBD_CMD_FLAG.NO_HOLE) === 0,
            noFallback: (req.flags & NBD_CMD_FLAG.FAST_ZERO) !== 0,
            fua,
          });
        }
        exp.forgetData(req.offset, req.length);
        this.#ok(req);
        return;
      }
      case NBD_CMD.BLOCK_STATUS:
        await this.#blockStatus(req, exp);
        return;
      default:
        throw new RequestError(NBD_ERR.EINVAL, `invalid request type (${req.type}) received`);
    }
  }

  #ok(req: NbdRequest): void {
    // From Node's shared slab: a fresh small Uint8Array would get an off-heap store of its own once the
    // socket takes it, one per request for the GC to sweep.
    const b = Buffer.allocUnsafe(NBD_SIMPLE_REPLY_SIZE);
    encodeSimpleReplyInto(b, 0, req.cookie);
    this.#write([b]);
  }

  async #read(req: NbdRequest, exp: NbdExport, df: boolean): Promise<void> {
    const { offset, length, cookie } = req;
    const edge = exp.edge;
    // Data is read into pooled buffers behind room for its reply header, so that header and data leave in
    // one socket write; the buffers go back to the pool once written. After a failure they are dropped (a
    // failed request may leave I/O on them behind it).
    const pool = this.host.bufferPool;
    if (this.#structured && length === 0) {
      this.#write([encodeChunk(NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE.NONE, cookie)]);
      return;
    }
    // Sparse read (structured, no DF): zero ranges become holes, the rest is read, all before anything
    // is sent (a failure is then a single error chunk). Undefined: one run of data.
    const runs = this.#structured && !df ? await exp.sparseRuns(offset, length) : undefined;
    if (runs === undefined) {
      const head = this.#structured ? OFFSET_DATA_HEADER_SIZE : NBD_SIMPLE_REPLY_SIZE;
      const buf = pool.acquire(length, head);
      if (length > 0) await edge.readInto(offset, buf.subarray(head));
      if (this.#structured) encodeOffsetDataHeaderInto(buf, NBD_REPLY_FLAG_DONE, cookie, offset, length);
      else encodeSimpleReplyInto(buf, 0, cookie);
      this.#write([buf], () => pool.release(buf));
      return;
    }
    const out: Uint8Array[] = [];
    const data: Uint8Array[] = [];
    for (const [i, r] of runs.entries()) {
      const flags = i === runs.length - 1 ? NBD_REPLY_FLAG_DONE : 0;
      if (r.zero) {
        out.push(encodeOffsetHole(flags, cookie, r.offset, r.length));
      } else {
        const buf = pool.acquire(r.length, OFFSET_DATA_HEADER_SIZE);
        await edge.readInto(r.offset, buf.subarray(OFFSET_DATA_HEADER_SIZE));
        encodeOffsetDataHeaderInto(buf, flags, cookie, r.offset, r.length);
        out.push(buf);
        data.push(buf);
      }
    }
    this.#write(out, () => {
      for (const b of data) pool.release(b);
    });
  }

  async #blockStatus(req: NbdRequest, exp: NbdExport): Promise<void> {
    const meta = this.#meta;
    if (!this.#structured || meta === undefined || meta.exp !== exp || meta.contexts.length === 0) {
      throw new RequestError(NBD_ERR.EINVAL, "no meta context selected for block status");
    }
    this.#check(req, exp, NBD_CMD_FLAG.REQ_ONE, "read");
    if (req.length === 0) throw new RequestError(NBD_ERR.EINVAL, "block status of length 0");
    const reqOne = (req.flags & NBD_CMD_FLAG.REQ_ONE) !== 0;
    const all = await exp.blockStatus(meta.contexts, req.offset, req.length, reqOne);
    const out = meta.contexts.map((c, i) =>
      encodeBlockStatusChunk(
        i === meta.contexts.length - 1 ? NBD_REPLY_FLAG_DONE : 0,
        req.cookie,
        c.id,
        all[i] ?? [],
      ),
    );
    this.#write(out);
  }
}
