/**
 * The QMP server side (shared/spec/qmp.md §1; transcripts in shared/spec/qmp-transcripts.md §1, §6):
 * greeting, capabilities negotiation, request checks with QEMU's texts, `id` echo, one-at-a-time in-order
 * execution per session, events with timestamps to every negotiated session, CRLF-terminated ASCII output.
 * Sessions run over unix or TCP sockets, or over any duplex stream (a daemon's `--chardev socket` monitor).
 */
import { lstatSync, unlinkSync } from "node:fs";
import { type AddressInfo, createServer, type Server } from "node:net";
import type { Duplex } from "node:stream";
import { QmpError } from "../errors.ts";
import { encodeQmpJson } from "./encode.ts";
import { type QmpJsonLimits, type QmpJsonMessage, type QmpJsonObject, QmpJsonReader } from "./json.ts";
import { qdictKeyOrder } from "./qdict.ts";
import {
  type CommandContext,
  type CommandRegistry,
  type QmpSessionHandle,
  qmpCapabilitiesArgs,
  toQmpError,
} from "./registry.ts";

/** Options of {@link QmpServer}. */
export interface QmpServerOptions {
  /** The commands; its `version` is what the greeting reports. */
  registry: CommandRegistry;
  /** Capabilities offered in the greeting (default `["oob"]`, as qemu-storage-daemon). */
  capabilities?: readonly string[];
  /** Input limits per message (defaults are QEMU's: 64 MiB, 2 Mi tokens, depth 1024). */
  limits?: QmpJsonLimits;
  /**
   * Parsed requests waiting per session (default 8, QEMU's queue length with `oob`). When full, the session
   * stops reading its socket until a command finished, so a fast writer cannot make the server buffer input.
   */
  maxQueuedCommands?: number;
  /**
   * Unsent output bytes per session (default 16 MiB). A session that does not read its answers and events
   * beyond this is dropped (QEMU lets its buffer grow without bound).
   */
  maxOutputBytes?: number;
  /** Microseconds since the Unix epoch, for event timestamps (default: wall clock). */
  clock?: () => number;
  /**
   * Registers a `quit` command (unless the registry has one) that answers `{}` and then calls this.
   */
  onQuit?: (session: QmpSessionHandle) => void | Promise<void>;
  /** Called with unexpected internal failures (a failing after-response hook, a stream error). */
  onError?: (error: unknown) => void;
}

/** Where to listen: a unix socket path, or a TCP port (and host). */
export type QmpListenOptions = { path: string } | { port: number; host?: string };

/** Counters for monitoring and tests. */
export interface QmpServerStats {
  /** Open sessions. */
  sessions: number;
  /** Input bytes held for unfinished messages and unread chunks, over all sessions. */
  bufferedInputBytes: number;
  /** Output bytes written but not yet taken by the peers, over all sessions. */
  bufferedOutputBytes: number;
  /** Requests parsed but not yet answered, over all sessions. */
  queuedCommands: number;
}

const defaultClock = (): number => Math.round((performance.timeOrigin + performance.now()) * 1000);

const isObject = (v: unknown): v is QmpJsonObject => typeof v === "object" && v !== null && !Array.isArray(v);

/** One QMP session (one connection). Created by {@link QmpServer}. */
export class QmpSession implements QmpSessionHandle {
  /** Unique per server, from 1. */
  readonly id: number;
  readonly #server: QmpServer;
  readonly #stream: Duplex;
  readonly #reader: QmpJsonReader;
  readonly #maxQueued: number;
  readonly #maxOutput: number;
  readonly #queue: QmpJsonMessage[] = [];
  readonly #pending: { chunk: Uint8Array; offset: number }[] = [];
  readonly #caps = new Set<string>();
  readonly #abort = new AbortController();
  #negotiated = false;
  #running = false;
  #paused = false;
  #ended = false;
  #closed = false;
  #closing: Promise<void> | undefined;
  #resolveClosed!: () => void;
  /** Resolves once the session is gone. */
  readonly closed: Promise<void>;

  /** @internal */
  constructor(server: QmpServer, stream: Duplex, id: number, options: SessionOptions) {
    this.id = id;
    this.#server = server;
    this.#stream = stream;
    this.#reader = new QmpJsonReader(options.limits);
    this.#maxQueued = options.maxQueued;
    this.#maxOutput = options.maxOutput;
    this.closed = new Promise((resolve) => {
      this.#resolveClosed = resolve;
    });
    stream.on("data", (chunk: Buffer | string) => {
      this.#onData(typeof chunk === "string" ? Buffer.from(chunk) : chunk);
    });
    stream.on("end", () => {
      this.#ended = true;
      this.#maybeFinish();
    });
    stream.on("error", (e: unknown) => {
      if ((e as { code?: string }).code !== "ECONNRESET" && (e as { code?: string }).code !== "EPIPE")
        options.onError?.(e);
      this.#teardown();
    });
    stream.on("close", () => this.#teardown());
    this.#writeLine(
      encodeQmpJson({ QMP: { version: server.registry.version, capabilities: [...options.offered] } }),
    );
  }

  /** Capabilities enabled by `qmp_capabilities`. */
  get capabilities(): ReadonlySet<string> {
    return this.#caps;
  }

  /** True once `qmp_capabilities` succeeded (command mode; events are delivered). */
  get negotiated(): boolean {
    return this.#negotiated;
  }

  /** True once the session is gone. */
  get isClosed(): boolean {
    return this.#closed;
  }

  /** Input bytes held (unfinished message plus unread chunks). */
  get bufferedInputBytes(): number {
    let n = this.#reader.bufferedBytes;
    for (const p of this.#pending) n += p.chunk.length - p.offset;
    return n;
  }

  /** Output bytes not yet taken by the peer. */
  get bufferedOutputBytes(): number {
    return this.#stream.writableLength;
  }

  /** Requests parsed but not yet answered. */
  get queuedCommands(): number {
    return this.#queue.length + (this.#running ? 1 : 0);
  }

  /** Ends the session: output already written is flushed, then the connection is closed. Idempotent. */
  close(): Promise<void> {
    this.#closing ??= (async () => {
      this.#abort.abort();
      if (!this.#closed) {
        const timer = setTimeout(() => this.#stream.destroy(), 2000);
        this.#stream.end();
        await this.closed;
        clearTimeout(timer);
      }
    })();
    return this.#closing;
  }

  /** Drops the connection at once. */
  destroy(): void {
    this.#stream.destroy();
    this.#teardown();
  }

  /** @internal writes an already-encoded event line if the session is in command mode. */
  deliverEvent(line: string): void {
    if (this.#negotiated) this.#writeLine(line);
  }

  #teardown(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#abort.abort();
    this.#queue.length = 0;
    this.#pending.length = 0;
    this.#reader.reset();
    this.#server._forget(this);
    this.#resolveClosed();
  }

  #writeLine(line: string): void {
    if (this.#closed || this.#stream.writableEnded) return;
    this.#stream.write(`${line}\r\n`);
    if (this.#stream.writableLength > this.#maxOutput) this.destroy();
  }

  #onData(chunk: Uint8Array): void {
    if (this.#closed) return;
    this.#pending.push({ chunk, offset: 0 });
    this.#pump();
  }

  /** Parses as much input as the queue allows, then runs the queue. */
  #pump(): void {
    while (this.#pending.length > 0 && this.#queue.length < this.#maxQueued && !this.#closed) {
      const p = this.#pending[0] as { chunk: Uint8Array; offset: number };
      p.offset = this.#reader.push(
        p.chunk,
        (m) => {
          this.#accept(m);
          return this.#queue.length < this.#maxQueued;
        },
        p.offset,
      );
      if (p.offset >= p.chunk.length) this.#pending.shift();
    }
    if (this.#closed) return;
    if (this.#pending.length > 0 && !this.#paused) {
      this.#paused = true;
      this.#stream.pause();
    } else if (this.#pending.length === 0 && this.#paused) {
      this.#paused = false;
      this.#stream.resume();
    }
    void this.#run();
  }

  #accept(m: QmpJsonMessage): void {
    // With `oob` enabled, `exec-oob` requests skip the queue, as in QEMU.
    if (
      m.ok &&
      this.#caps.has("oob") &&
      isObject(m.value) &&
      "exec-oob" in m.value &&
      !("execute" in m.value)
    ) {
      this.#execute(m).catch((e: unknown) => this.#server._reportError(e));
      return;
    }
    this.#queue.push(m);
  }

  async #run(): Promise<void> {
    if (this.#running) return;
    this.#running = true;
    try {
      for (;;) {
        const m = this.#queue.shift();
        if (m === undefined || this.#closed) break;
        if (this.#stream.writableNeedDrain) {
          await new Promise<void>((resolve) => {
            const done = (): void => {
              this.#stream.off("drain", done);
              this.#stream.off("close", done);
              resolve();
            };
            this.#stream.on("drain", done);
            this.#stream.on("close", done);
          });
        }
        try {
          await this.#execute(m);
        } catch (e) {
          this.#server._reportError(e);
        }
        this.#pump();
      }
    } finally {
      this.#running = false;
    }
    this.#maybeFinish();
  }

  #maybeFinish(): void {
    if (
      this.#ended &&
      !this.#running &&
      this.#queue.length === 0 &&
      this.#pending.length === 0 &&
      !this.#closed
    )
      this.#stream.end();
  }

  async #execute(m: QmpJsonMessage): Promise<void> {
    const after: (() => void | Promise<void>)[] = [];
    const request: { hasId: boolean; id: unknown } = { hasId: false, id: undefined };
    let response: unknown;
    try {
      const result = await this.#handle(m, after, (v) => {
        request.hasId = true;
        request.id = v;
      });
      response = request.hasId ? { return: result, id: request.id } : { return: result };
    } catch (e) {
      const err = toQmpError(e);
      response = request.hasId ? { id: request.id, error: err } : { error: err };
    }
    let line: string;
    try {
      line = encodeQmpJson(response);
    } catch (e) {
      // a result that cannot be encoded (cyclic, throwing toJSON) is the handler's bug, not the session's
      const err = new QmpError("GenericError", `Cannot encode the result: ${toQmpError(e).desc}`, {
        cause: e,
      });
      line = encodeQmpJson(request.hasId ? { id: request.id, error: err } : { error: err });
    }
    this.#writeLine(line);
    for (const fn of after) {
      try {
        await fn();
      } catch (e) {
        this.#server._reportError(e);
      }
    }
  }

  async #handle(
    m: QmpJsonMessage,
    after: (() => void | Promise<void>)[],
    setId: (id: unknown) => void,
  ): Promise<unknown> {
    if (!m.ok) throw new QmpError("GenericError", m.error);
    const req = m.value;
    if (!isObject(req)) throw new QmpError("GenericError", "QMP input must be a JSON object");
    if (Object.hasOwn(req, "id")) setId(req.id);
    // Members are checked in QEMU's QDict order, so that the member named is the one QEMU names.
    for (const key of qdictKeyOrder(Object.keys(req))) {
      const v = req[key];
      if (key === "execute" || (key === "exec-oob" && this.#caps.has("oob"))) {
        if (typeof v !== "string")
          throw new QmpError("GenericError", `QMP input member '${key}' must be a string`);
      } else if (key === "arguments") {
        if (!isObject(v))
          throw new QmpError("GenericError", "QMP input member 'arguments' must be an object");
      } else if (key !== "id") {
        throw new QmpError("GenericError", `QMP input member '${key}' is unexpected`);
      }
    }
    const execute = req.execute as string | undefined;
    const execOob = this.#caps.has("oob") ? (req["exec-oob"] as string | undefined) : undefined;
    if (execute !== undefined && execOob !== undefined)
      throw new QmpError("GenericError", "QMP input member 'execute' clashes with 'exec-oob'");
    const name = execute ?? execOob;
    const oob = execute === undefined;
    if (name === undefined) throw new QmpError("GenericError", "QMP input lacks member 'execute'");
    const args = req.arguments as QmpJsonObject | undefined;
    if (!this.#negotiated) {
      if (name !== "qmp_capabilities")
        throw new QmpError("CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'");
      const { enable } = qmpCapabilitiesArgs.parse(args ?? {});
      const missing = enable.filter((c) => !this.#server.capabilities.includes(c));
      if (missing.length > 0)
        throw new QmpError("GenericError", `Capability ${missing.join(", ")} not available`);
      for (const c of enable) this.#caps.add(c);
      this.#negotiated = true;
      return {};
    }
    const registry = this.#server.registry;
    const command = registry.get(name);
    if (command === undefined)
      throw new QmpError("CommandNotFound", `The command ${name} has not been found`);
    if (oob && command.allowOob !== true)
      throw new QmpError("GenericError", `The command ${name} does not support OOB`);
    const ctx: CommandContext = {
      session: this,
      emit: (event, data) => this.#server.emit(event, data),
      signal: this.#abort.signal,
      afterResponse: (fn) => {
        after.push(fn);
      },
    };
    return registry.run(command, args, ctx);
  }
}

interface SessionOptions {
  limits: QmpJsonLimits | undefined;
  maxQueued: number;
  maxOutput: number;
  offered: readonly string[];
  onError: ((e: unknown) => void) | undefined;
}

/**
 * A QMP server: accepts sessions on unix or TCP sockets (or attached streams) and runs commands from a
 * {@link CommandRegistry}.
 * @example
 * const registry = new CommandRegistry();
 * const server = new QmpServer({ registry });
 * await server.listen({ path: "/tmp/qmp.sock" });
 * server.emit("BLOCK_EXPORT_DELETED", { id: "exp0" });
 * await server.close();
 */
export class QmpServer {
  /** The commands served. */
  readonly registry: CommandRegistry;
  /** Capabilities offered in the greeting. */
  readonly capabilities: readonly string[];
  readonly #options: QmpServerOptions;
  readonly #sessions = new Set<QmpSession>();
  readonly #listeners: { server: Server; path: string | undefined }[] = [];
  readonly #clock: () => number;
  #nextId = 1;
  #closing: Promise<void> | undefined;

  constructor(options: QmpServerOptions) {
    this.#options = options;
    this.registry = options.registry;
    this.capabilities = Object.freeze([...(options.capabilities ?? ["oob"])]);
    this.#clock = options.clock ?? defaultClock;
    const onQuit = options.onQuit;
    if (onQuit !== undefined && !this.registry.has("quit")) {
      this.registry.add({
        name: "quit",
        handler: (_args: unknown, ctx: CommandContext) => {
          const session = ctx.session;
          if (session !== undefined) ctx.afterResponse(() => onQuit(session));
          return {};
        },
      });
    }
  }

  /** Open sessions. */
  get sessions(): ReadonlySet<QmpSession> {
    return this.#sessions;
  }

  /** Totals over all sessions. */
  stats(): QmpServerStats {
    const s: QmpServerStats = {
      sessions: 0,
      bufferedInputBytes: 0,
      bufferedOutputBytes: 0,
      queuedCommands: 0,
    };
    for (const session of this.#sessions) {
      s.sessions++;
      s.bufferedInputBytes += session.bufferedInputBytes;
      s.bufferedOutputBytes += session.bufferedOutputBytes;
      s.queuedCommands += session.queuedCommands;
    }
    return s;
  }

  /**
   * Listens for connections. A stale unix socket file at `path` is replaced (and removed again on close).
   * Returns the bound address (useful with `port: 0`).
   * @throws {Error} when the server is closing, or the bind fails
   */
  async listen(options: QmpListenOptions): Promise<AddressInfo | string> {
    if (this.#closing !== undefined) throw new Error("QmpServer is closed");
    const server = createServer({ allowHalfOpen: true }, (socket) => {
      socket.setNoDelay(true);
      this.attach(socket);
    });
    const path = "path" in options ? options.path : undefined;
    if (path !== undefined) {
      try {
        if (lstatSync(path).isSocket()) unlinkSync(path);
      } catch {
        // nothing there
      }
    }
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      if (path !== undefined) server.listen(path, () => resolve());
      else {
        const tcp = options as { port: number; host?: string };
        server.listen(tcp.port, tcp.host ?? "127.0.0.1", () => resolve());
      }
    });
    server.on("error", (e) => this._reportError(e));
    this.#listeners.push({ server, path });
    const address = server.address();
    return address ?? path ?? "";
  }

  /** Starts a session over an already connected duplex stream (socket, pipe pair, chardev). */
  attach(stream: Duplex): QmpSession {
    const session = new QmpSession(this, stream, this.#nextId++, {
      limits: this.#options.limits,
      maxQueued: Math.max(1, this.#options.maxQueuedCommands ?? 8),
      maxOutput: this.#options.maxOutputBytes ?? 16 * 1024 * 1024,
      offered: this.capabilities,
      onError: this.#options.onError,
    });
    if (this.#closing !== undefined) session.destroy();
    else if (!session.isClosed) this.#sessions.add(session);
    return session;
  }

  /**
   * Sends an event to every session in command mode: `{"timestamp": …, "event": NAME, "data": …}`.
   * Synchronous: an event emitted by a handler is written before that command's return.
   */
  emit(event: string, data?: Record<string, unknown>): void {
    const us = this.#clock();
    const seconds = Math.floor(us / 1e6);
    const timestamp = { seconds, microseconds: us - seconds * 1e6 };
    const line = encodeQmpJson(data === undefined ? { timestamp, event } : { timestamp, event, data });
    for (const session of this.#sessions) session.deliverEvent(line);
  }

  /** Closes every session (flushing what was written), keeping the listeners. */
  async closeSessions(): Promise<void> {
    await Promise.all([...this.#sessions].map((s) => s.close()));
  }

  /** Stops listening and closes all sessions. Idempotent; returns the same promise each time. */
  close(): Promise<void> {
    this.#closing ??= (async () => {
      const listeners = this.#listeners.splice(0);
      const stopped = listeners.map(
        ({ server }) => new Promise<void>((resolve) => server.close(() => resolve())),
      );
      await this.closeSessions();
      await Promise.all(stopped);
      for (const { path } of listeners) {
        if (path === undefined) continue;
        try {
          unlinkSync(path);
        } catch {
          // already gone
        }
      }
    })();
    return this.#closing;
  }

  /** Same as {@link QmpServer.close}. */
  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }

  /** @internal */
  _forget(session: QmpSession): void {
    this.#sessions.delete(session);
  }

  /** @internal */
  _reportError(e: unknown): void {
    this.#options.onError?.(e);
  }
}
