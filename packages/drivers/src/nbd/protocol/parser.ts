/**
 * Incremental NBD parsers over a byte stream, one per direction, as explicit state machines:
 * `push(chunk)` buffers bytes (split anywhere, several messages per chunk), `next()` returns the next
 * complete message or `undefined` when more bytes are needed. The consumer switches phases between two
 * `next()` calls (the protocol itself decides when transmission starts). Limits are checked on the
 * header, before anything of the claimed size is gathered; after the first framing error the parser
 * refuses all further input (`push` and `next` throw the same {@link NbdProtocolError}).
 *
 * References: NetworkBlockDevice/nbd `doc/proto.md` — "Fixed newstyle negotiation", "Request message",
 * "Simple reply message", "Structured reply chunk message".
 */
import { ByteQueue, rd16, rd32, rd64, rd64n } from "./bytes.ts";
import {
  NBD_CHUNK_HEADER_SIZE,
  NBD_CMD,
  NBD_GREETING_SIZE,
  NBD_IHAVEOPT,
  NBD_MAGIC,
  NBD_MAX_PAYLOAD,
  NBD_MAX_STRING,
  NBD_OPTION_HEADER_SIZE,
  NBD_OPTION_REPLY_HEADER_SIZE,
  NBD_REP_MAGIC,
  NBD_REQUEST_MAGIC,
  NBD_REQUEST_SIZE,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_SIMPLE_REPLY_SIZE,
  NBD_STRUCTURED_REPLY_MAGIC,
} from "./constants.ts";
import { NbdProtocolError } from "./errors.ts";

const hex = (n: number | bigint, digits: number): string => `0x${n.toString(16).padStart(digits, "0")}`;

/** A transmission request as received (compact header plus WRITE data). */
export interface NbdRequest {
  kind: "request";
  flags: number;
  type: number;
  cookie: bigint;
  /** Byte offset; values ≥ 2^53 are not safe integers (the server answers EINVAL). */
  offset: number;
  length: number;
  /** WRITE data (`length` bytes); undefined for every other command. */
  data: Uint8Array | undefined;
}

/** What a client sends, as {@link NbdClientStreamParser} returns it. */
export type NbdClientMessage =
  | { kind: "client-flags"; flags: number }
  | { kind: "option"; option: number; data: Uint8Array }
  /** An option whose length exceeded the limit: its data was skipped without being stored. */
  | { kind: "option-too-big"; option: number; length: number }
  | NbdRequest;

/** Limits of {@link NbdClientStreamParser}. */
export interface NbdClientStreamParserOptions {
  /** Largest option data kept (longer options are skipped and reported as `option-too-big`). Default 65536. */
  maxOptionLength?: number;
  /** Largest WRITE payload; a longer one is a protocol error (the payload is never read). Default 32 MiB. */
  maxPayload?: number;
  /**
   * Allocates the buffer a WRITE payload is gathered into when it straddles received chunks (a payload
   * inside one pushed chunk is returned as a view of it). Must return exactly `n` bytes; they are
   * overwritten. Default: a new zeroed array. A payload of more than `eagerPayload` bytes is gathered as
   * its bytes arrive once a quarter of it is there (the allocation is never more than four times what the
   * client sent of it); a smaller one as soon as its request header is parsed.
   */
  allocatePayload?: (n: number) => Uint8Array;
  /** See `allocatePayload`. Default 0. */
  eagerPayload?: number;
  /**
   * Where {@link NbdClientStreamParser.settle} keeps the unparsed rest of a transient chunk (`allocate`
   * returns exactly `n` bytes), and where such a copy goes once parsed. Default: new arrays, dropped.
   */
  holdTransient?: { allocate: (n: number) => Uint8Array; release: (b: Uint8Array) => void };
}

type ClientState =
  | { s: "flags" }
  | { s: "options" }
  | { s: "option-data"; option: number; length: number }
  | { s: "option-skip"; option: number; length: number; left: number }
  | { s: "transmission" }
  /** `buf`: where the payload is gathered (once a quarter arrived), `filled` bytes of it so far. */
  | { s: "write-data"; req: NbdRequest; buf: Uint8Array | undefined; filled: number };

/**
 * Parses the client → server stream (used by servers): the 32-bit client flags, option requests, and,
 * after {@link NbdClientStreamParser.enterTransmission}, requests with their WRITE payloads.
 * @example
 * const p = new NbdClientStreamParser();
 * p.push(bytes);
 * for (let m = p.next(); m !== undefined; m = p.next()) handle(m);
 */
export class NbdClientStreamParser {
  readonly maxOptionLength: number;
  readonly maxPayload: number;
  #q: ByteQueue;
  #st: ClientState = { s: "flags" };
  #failed: NbdProtocolError | undefined;
  #allocatePayload: ((n: number) => Uint8Array) | undefined;
  #eagerPayload: number;
  #holdAllocate: ((n: number) => Uint8Array) | undefined;

  constructor(options: NbdClientStreamParserOptions = {}) {
    this.maxOptionLength = options.maxOptionLength ?? 65536;
    this.maxPayload = options.maxPayload ?? NBD_MAX_PAYLOAD;
    this.#allocatePayload = options.allocatePayload;
    this.#eagerPayload = options.eagerPayload ?? 0;
    const hold = options.holdTransient;
    this.#holdAllocate = hold?.allocate;
    this.#q = new ByteQueue(hold === undefined ? {} : { release: hold.release });
  }

  /** Bytes buffered and not yet returned. */
  get buffered(): number {
    return this.#q.length;
  }

  /** The error that stopped the parser, if any. */
  get failed(): NbdProtocolError | undefined {
    return this.#failed;
  }

  /** `flags`, `options` (also while inside an option's data) or `transmission`. */
  get phase(): "flags" | "options" | "transmission" {
    const s = this.#st.s;
    return s === "flags" ? "flags" : s === "transmission" || s === "write-data" ? "transmission" : "options";
  }

  /** Buffers bytes. @throws {NbdProtocolError} once the parser has failed */
  push(chunk: Uint8Array): void {
    if (this.#failed) throw this.#failed;
    this.#q.push(chunk);
  }

  /**
   * Buffers bytes whose memory the caller reuses after calling {@link NbdClientStreamParser.settle} (a
   * socket's reusable read buffer): messages returned before settle() never refer to it.
   * @throws {NbdProtocolError} once the parser has failed
   */
  pushTransient(chunk: Uint8Array): void {
    if (this.#failed) throw this.#failed;
    this.#q.pushTransient(chunk);
  }

  /** Keeps a copy of what is still unparsed of the transient chunk: its memory is the caller's again. */
  settle(): void {
    this.#q.settle(this.#holdAllocate);
  }

  /**
   * While a WRITE payload is being gathered and every byte received so far is in it: the part of its
   * buffer still to fill, when at least `min` bytes. The caller may place the next bytes of the stream
   * there itself (a socket reading straight into it), then must report them with
   * {@link NbdClientStreamParser.payloadFilled} before anything else is pushed.
   */
  payloadSpace(min: number): Uint8Array | undefined {
    const st = this.#st;
    if (st.s !== "write-data" || st.buf === undefined || this.#q.length > 0 || this.#failed) return undefined;
    const left = st.req.length - st.filled;
    return left >= min && left > 0 ? st.buf.subarray(st.filled) : undefined;
  }

  /** Bytes of the WRITE payload being received still to come (0 outside a payload). */
  get payloadPending(): number {
    const st = this.#st;
    if (st.s !== "write-data") return 0;
    return Math.max(0, st.req.length - (st.buf === undefined ? this.#q.length : st.filled));
  }

  /** `n` bytes of the stream were placed at the start of the last {@link NbdClientStreamParser.payloadSpace}. */
  payloadFilled(n: number): void {
    const st = this.#st;
    if (
      st.s !== "write-data" ||
      st.buf === undefined ||
      this.#q.length > 0 ||
      n > st.req.length - st.filled
    ) {
      throw new Error("payloadFilled() without a matching payloadSpace()");
    }
    st.filled += n;
  }

  /** Switches to transmission: the bytes from here on are requests. */
  enterTransmission(): void {
    if (this.#st.s !== "options") {
      throw this.#fail("UNEXPECTED", `cannot enter transmission from state ${this.#st.s}`);
    }
    this.#st = { s: "transmission" };
  }

  #fail(reason: NbdProtocolError["reason"], message: string): NbdProtocolError {
    this.#failed = new NbdProtocolError(reason, message);
    this.#q.clear();
    return this.#failed;
  }

  /** The next complete message, or undefined. @throws {NbdProtocolError} on a framing error */
  next(): NbdClientMessage | undefined {
    if (this.#failed) throw this.#failed;
    const q = this.#q;
    for (;;) {
      const st = this.#st;
      switch (st.s) {
        case "flags": {
          if (q.length < 4) return undefined;
          const flags = rd32(q.take(4), 0);
          this.#st = { s: "options" };
          return { kind: "client-flags", flags };
        }
        case "options": {
          if (q.length < NBD_OPTION_HEADER_SIZE) return undefined;
          const h = q.peek(NBD_OPTION_HEADER_SIZE);
          const magic = rd64n(h, 0);
          if (magic !== NBD_IHAVEOPT) {
            throw this.#fail("BAD_MAGIC", `option magic ${hex(magic, 16)}, expected IHAVEOPT`);
          }
          const option = rd32(h, 8);
          const length = rd32(h, 12);
          q.skip(NBD_OPTION_HEADER_SIZE);
          this.#st =
            length > this.maxOptionLength
              ? { s: "option-skip", option, length, left: length }
              : { s: "option-data", option, length };
          continue;
        }
        case "option-data": {
          if (q.length < st.length) return undefined;
          const data = q.take(st.length);
          this.#st = { s: "options" };
          return { kind: "option", option: st.option, data };
        }
        case "option-skip": {
          const n = Math.min(st.left, q.length);
          q.skip(n);
          st.left -= n;
          if (st.left > 0) return undefined;
          this.#st = { s: "options" };
          return { kind: "option-too-big", option: st.option, length: st.length };
        }
        case "transmission": {
          if (q.length < NBD_REQUEST_SIZE) return undefined;
          const h = q.peek(NBD_REQUEST_SIZE);
          const magic = rd32(h, 0);
          if (magic !== NBD_REQUEST_MAGIC) {
            throw this.#fail(
              "BAD_MAGIC",
              `request magic ${hex(magic, 8)}, expected ${hex(NBD_REQUEST_MAGIC, 8)}`,
            );
          }
          const req: NbdRequest = {
            kind: "request",
            flags: rd16(h, 4),
            type: rd16(h, 6),
            cookie: rd64n(h, 8),
            offset: rd64(h, 16),
            length: rd32(h, 24),
            data: undefined,
          };
          q.skip(NBD_REQUEST_SIZE);
          if (req.type !== NBD_CMD.WRITE) return req;
          if (req.length > this.maxPayload) {
            throw this.#fail(
              "TOO_BIG",
              `write payload of ${req.length} bytes exceeds the limit ${this.maxPayload}`,
            );
          }
          this.#st = { s: "write-data", req, buf: undefined, filled: 0 };
          continue;
        }
        case "write-data": {
          const length = st.req.length;
          if (st.buf === undefined) {
            if (q.length >= length) {
              st.req.data = q.take(length, this.#allocatePayload);
              this.#st = { s: "transmission" };
              return st.req;
            }
            // Gather as it arrives (nothing received stays queued): small payloads at once, larger ones once
            // the client sent a quarter.
            if (length > this.#eagerPayload && q.length * 4 < length) return undefined;
            st.buf =
              this.#allocatePayload === undefined ? new Uint8Array(length) : this.#allocatePayload(length);
          }
          const n = Math.min(q.length, length - st.filled);
          if (n > 0) q.read(st.buf, st.filled, n);
          st.filled += n;
          if (st.filled < length) return undefined;
          st.req.data = st.buf;
          this.#st = { s: "transmission" };
          return st.req;
        }
      }
    }
  }
}

// ---- server → client ------------------------------------------------------------------------------------

/** What a server sends, as {@link NbdServerStreamParser} returns it. */
export type NbdServerMessage =
  | { kind: "greeting"; handshakeFlags: number }
  | { kind: "option-reply"; option: number; type: number; data: Uint8Array }
  | { kind: "export-name-reply"; size: number; transmissionFlags: number }
  | { kind: "simple-reply"; error: number; cookie: bigint; data: Uint8Array | undefined }
  | { kind: "chunk"; flags: number; type: number; cookie: bigint; payload: Uint8Array };

/** Limits of {@link NbdServerStreamParser}. */
export interface NbdServerStreamParserOptions {
  /** Largest option reply data accepted. Default 3 × 4096 + 64 (room for a name and a description). */
  maxOptionReplyLength?: number;
  /** Largest structured chunk payload accepted. Default 32 MiB + 8 (a full OFFSET_DATA chunk). */
  maxChunkLength?: number;
  /**
   * Length of the data that follows a successful simple reply with this cookie (the client remembers its
   * READs), or undefined when no data follows. Default: no data ever follows.
   */
  readLength?: (cookie: bigint) => number | undefined;
  /**
   * Where transmission payloads (READ data, chunk payloads) that straddle received chunks are gathered
   * (default: a new array each). An allocator that hands out the same memory again makes each payload
   * valid only until the next call to `next()`.
   */
  allocatePayload?: (n: number) => Uint8Array;
}

type ServerState =
  | { s: "greeting" }
  | { s: "options" }
  | { s: "option-data"; option: number; type: number; length: number }
  | { s: "export-name"; noZeroes: boolean }
  | { s: "transmission" }
  | { s: "simple-data"; cookie: bigint; length: number }
  | { s: "chunk-data"; flags: number; type: number; cookie: bigint; length: number };

/**
 * Parses the server → client stream (used by clients and tests): greeting, option replies, the
 * EXPORT_NAME reply (after {@link NbdServerStreamParser.expectExportNameReply}), and after
 * {@link NbdServerStreamParser.enterTransmission} simple replies and structured chunks.
 */
export class NbdServerStreamParser {
  readonly maxOptionReplyLength: number;
  readonly maxChunkLength: number;
  readLength: (cookie: bigint) => number | undefined;
  #allocatePayload: ((n: number) => Uint8Array) | undefined;
  #q = new ByteQueue();
  #st: ServerState = { s: "greeting" };
  #failed: NbdProtocolError | undefined;

  constructor(options: NbdServerStreamParserOptions = {}) {
    this.maxOptionReplyLength = options.maxOptionReplyLength ?? 3 * NBD_MAX_STRING + 64;
    this.maxChunkLength = options.maxChunkLength ?? NBD_MAX_PAYLOAD + 8;
    this.readLength = options.readLength ?? (() => undefined);
    this.#allocatePayload = options.allocatePayload;
  }

  /** Bytes buffered and not yet returned. */
  get buffered(): number {
    return this.#q.length;
  }

  /** The error that stopped the parser, if any. */
  get failed(): NbdProtocolError | undefined {
    return this.#failed;
  }

  /** Buffers bytes. @throws {NbdProtocolError} once the parser has failed */
  push(chunk: Uint8Array): void {
    if (this.#failed) throw this.#failed;
    this.#q.push(chunk);
  }

  /** The client sent `NBD_OPT_EXPORT_NAME`: the next bytes are size, flags and maybe 124 zeroes. */
  expectExportNameReply(noZeroes: boolean): void {
    if (this.#st.s !== "options") {
      throw this.#fail("UNEXPECTED", `cannot expect an export-name reply in state ${this.#st.s}`);
    }
    this.#st = { s: "export-name", noZeroes };
  }

  /** GO was acknowledged: the next bytes are replies. */
  enterTransmission(): void {
    if (this.#st.s !== "options") {
      throw this.#fail("UNEXPECTED", `cannot enter transmission from state ${this.#st.s}`);
    }
    this.#st = { s: "transmission" };
  }

  #fail(reason: NbdProtocolError["reason"], message: string): NbdProtocolError {
    this.#failed = new NbdProtocolError(reason, message);
    this.#q.clear();
    return this.#failed;
  }

  /** The next complete message, or undefined. @throws {NbdProtocolError} on a framing error */
  next(): NbdServerMessage | undefined {
    if (this.#failed) throw this.#failed;
    const q = this.#q;
    for (;;) {
      const st = this.#st;
      switch (st.s) {
        case "greeting": {
          if (q.length < 16) return undefined;
          const h = q.peek(16);
          const magic = rd64n(h, 0);
          if (magic !== NBD_MAGIC)
            throw this.#fail("BAD_MAGIC", `greeting magic ${hex(magic, 16)}, expected NBDMAGIC`);
          const second = rd64n(h, 8);
          if (second !== NBD_IHAVEOPT) {
            throw this.#fail("BAD_MAGIC", `greeting magic ${hex(second, 16)}, expected IHAVEOPT (newstyle)`);
          }
          if (q.length < NBD_GREETING_SIZE) return undefined;
          const handshakeFlags = rd16(q.take(NBD_GREETING_SIZE), 16);
          this.#st = { s: "options" };
          return { kind: "greeting", handshakeFlags };
        }
        case "options": {
          if (q.length < NBD_OPTION_REPLY_HEADER_SIZE) return undefined;
          const h = q.peek(NBD_OPTION_REPLY_HEADER_SIZE);
          const magic = rd64n(h, 0);
          if (magic !== NBD_REP_MAGIC) {
            throw this.#fail(
              "BAD_MAGIC",
              `option reply magic ${hex(magic, 16)}, expected ${hex(NBD_REP_MAGIC, 16)}`,
            );
          }
          const length = rd32(h, 16);
          if (length > this.maxOptionReplyLength) {
            throw this.#fail(
              "TOO_BIG",
              `option reply of ${length} bytes exceeds the limit ${this.maxOptionReplyLength}`,
            );
          }
          this.#st = { s: "option-data", option: rd32(h, 8), type: rd32(h, 12), length };
          q.skip(NBD_OPTION_REPLY_HEADER_SIZE);
          continue;
        }
        case "option-data": {
          if (q.length < st.length) return undefined;
          const data = q.take(st.length);
          this.#st = { s: "options" };
          return { kind: "option-reply", option: st.option, type: st.type, data };
        }
        case "export-name": {
          const n = st.noZeroes ? 10 : 134;
          if (q.length < n) return undefined;
          const b = q.take(n);
          const size = rd64(b, 0);
          if (!Number.isSafeInteger(size))
            throw this.#fail("BAD_VALUE", `export size ${size} is not below 2^53`);
          this.#st = { s: "transmission" };
          return { kind: "export-name-reply", size, transmissionFlags: rd16(b, 8) };
        }
        case "transmission": {
          if (q.length < 4) return undefined;
          const magic = rd32(q.peek(4), 0);
          if (magic === NBD_SIMPLE_REPLY_MAGIC) {
            if (q.length < NBD_SIMPLE_REPLY_SIZE) return undefined;
            const h = q.take(NBD_SIMPLE_REPLY_SIZE);
            const error = rd32(h, 4);
            const cookie = rd64n(h, 8);
            const len = error === 0 ? this.readLength(cookie) : undefined;
            if (len === undefined) return { kind: "simple-reply", error, cookie, data: undefined };
            this.#st = { s: "simple-data", cookie, length: len };
            continue;
          }
          if (magic === NBD_STRUCTURED_REPLY_MAGIC) {
            if (q.length < NBD_CHUNK_HEADER_SIZE) return undefined;
            const h = q.peek(NBD_CHUNK_HEADER_SIZE);
            const length = rd32(h, 16);
            if (length > this.maxChunkLength) {
              throw this.#fail(
                "TOO_BIG",
                `reply chunk of ${length} bytes exceeds the limit ${this.maxChunkLength}`,
              );
            }
            this.#st = { s: "chunk-data", flags: rd16(h, 4), type: rd16(h, 6), cookie: rd64n(h, 8), length };
            q.skip(NBD_CHUNK_HEADER_SIZE);
            continue;
          }
          throw this.#fail("BAD_MAGIC", `reply magic ${hex(magic, 8)} is neither simple nor structured`);
        }
        case "simple-data": {
          if (q.length < st.length) return undefined;
          const data = q.take(st.length, this.#allocatePayload);
          this.#st = { s: "transmission" };
          return { kind: "simple-reply", error: 0, cookie: st.cookie, data };
        }
        case "chunk-data": {
          if (q.length < st.length) return undefined;
          const payload = q.take(st.length, this.#allocatePayload);
          this.#st = { s: "transmission" };
          return { kind: "chunk", flags: st.flags, type: st.type, cookie: st.cookie, payload };
        }
      }
    }
  }
}
