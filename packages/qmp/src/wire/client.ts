/**
 * A typed QMP client for QEMU, qemu-storage-daemon and blkd (shared/spec/qmp.md §1): reads the greeting,
 * negotiates, runs many commands at once matched by `id`, and buffers events so that an event that arrives
 * before the `return` of the command that caused it is not lost.
 */
import { connect as netConnect } from "node:net";
import type { Duplex } from "node:stream";
import { QMP_ERROR_CLASSES, QmpError, type QmpErrorClass } from "../errors.ts";
import { encodeQmpJson } from "./encode.ts";
import { type QmpJsonLimits, type QmpJsonObject, QmpJsonReader, type QmpJsonValue } from "./json.ts";
import type { QmpVersionInfo } from "./registry.ts";

/** Stable codes of {@link QmpConnectionError}. */
export const QMP_CONNECTION_ERROR_CODES = {
  /** `close()` was called (or the client was disposed) while the call was pending. */
  ERR_QMP_CLOSED: "ERR_QMP_CLOSED",
  /** The peer closed the connection, or the socket failed. */
  ERR_QMP_DISCONNECTED: "ERR_QMP_DISCONNECTED",
  /** A connect, greeting, command or event wait took longer than its time-out. */
  ERR_QMP_TIMEOUT: "ERR_QMP_TIMEOUT",
  /** The peer sent something that is not QMP (bad greeting, unparsable output). */
  ERR_QMP_PROTOCOL: "ERR_QMP_PROTOCOL",
  /** An event iterator's buffer overflowed because it was not read. */
  ERR_QMP_EVENT_OVERFLOW: "ERR_QMP_EVENT_OVERFLOW",
} as const;

/** One of {@link QMP_CONNECTION_ERROR_CODES}. */
export type QmpConnectionErrorCode = keyof typeof QMP_CONNECTION_ERROR_CODES;

const kConnError = Symbol.for("@blk/qmp-connection-error");

/**
 * The connection (not the command) failed: every pending call rejects with it.
 * @example
 * if (isQmpConnectionError(e, "ERR_QMP_DISCONNECTED")) reconnect();
 */
export class QmpConnectionError extends Error {
  override readonly name = "QmpConnectionError";
  readonly code: QmpConnectionErrorCode;
  constructor(code: QmpConnectionErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.code = code;
    Object.defineProperty(this, kConnError, { value: true });
  }
  static override [Symbol.hasInstance](v: unknown): boolean {
    return typeof v === "object" && v !== null && kConnError in v;
  }
}

/** True when `v` is a {@link QmpConnectionError} (with `code`, when given). */
export const isQmpConnectionError = (v: unknown, code?: QmpConnectionErrorCode): v is QmpConnectionError =>
  v instanceof QmpConnectionError && (code === undefined || v.code === code);

/** The server's greeting. */
export interface QmpGreeting {
  version: QmpVersionInfo;
  capabilities: string[];
}

/** An event as received. */
export interface QmpEvent<D = Record<string, unknown>> {
  event: string;
  data: D;
  timestamp: { seconds: number; microseconds: number };
  /** Position in this client's event sequence (1, 2, …); compare with {@link QmpClient.eventMark}. */
  seq: number;
}

/** Where and how to connect. */
export type QmpConnectTarget = { path: string } | { port: number; host?: string } | { stream: Duplex };

/** Options of {@link QmpClient.connect}. */
export interface QmpClientOptions {
  /** Send `qmp_capabilities` after the greeting (default true). */
  negotiate?: boolean;
  /** Capabilities to enable while negotiating (default none). */
  enable?: string[];
  /** Milliseconds for connecting, the greeting and negotiation together (default 10 s). */
  timeoutMs?: number;
  /** Events kept for `waitEvent({ since })` and late iterators (default 1000). */
  eventHistory?: number;
  /** Input limits (defaults are QEMU's). */
  limits?: QmpJsonLimits;
}

/** Options of {@link QmpClient.execute}. */
export interface QmpExecuteOptions {
  /** Reject with ERR_QMP_TIMEOUT after this many milliseconds (the command still runs on the server). */
  timeoutMs?: number;
}

/** Options of {@link QmpClient.waitEvent}. */
export interface QmpWaitEventOptions<D> {
  /** Only events whose data satisfies this. */
  where?: (data: D, event: QmpEvent<D>) => boolean;
  /** Reject with ERR_QMP_TIMEOUT after this many milliseconds (default: wait forever). */
  timeoutMs?: number;
  /**
   * Also consider buffered events received after this mark (from {@link QmpClient.eventMark}), so an event
   * that arrived before `waitEvent` was called (even before the `return` of its command) is found. Default:
   * only events that arrive from now on.
   */
  since?: number;
}

/** Options of {@link QmpClient.events}. */
export interface QmpEventsOptions {
  /** Start with the buffered events received after this mark. */
  since?: number;
  /** Unread events kept before the iterator fails with ERR_QMP_EVENT_OVERFLOW (default 10 000). */
  maxBuffered?: number;
}

interface Pending {
  resolve(v: unknown): void;
  reject(e: Error): void;
  timer: NodeJS.Timeout | undefined;
}

interface Waiter {
  offer(e: QmpEvent): boolean;
  fail(e: Error): void;
}

const noOffer = (): boolean => false;

const isObject = (v: unknown): v is QmpJsonObject => typeof v === "object" && v !== null && !Array.isArray(v);

/**
 * A QMP client.
 * @example
 * await using qmp = await QmpClient.connect({ path: "/tmp/qsd/qmp.sock" });
 * const version = await qmp.execute<{ package: string }>("query-version");
 * const mark = qmp.eventMark();
 * await qmp.execute("blockdev-mirror", { "job-id": "m0", device: "src", target: "dst", sync: "full" });
 * await qmp.waitEvent("BLOCK_JOB_READY", { since: mark, where: (d) => d.device === "m0" });
 */
export class QmpClient {
  readonly #stream: Duplex;
  readonly #reader: QmpJsonReader;
  readonly #pending = new Map<number, Pending>();
  readonly #waiters = new Set<Waiter>();
  readonly #history: QmpEvent[] = [];
  readonly #historyMax: number;
  #nextId = 1;
  #seq = 0;
  #failure: QmpConnectionError | undefined;
  #closing: Promise<void> | undefined;
  #onGreeting: ((g: QmpJsonValue) => void) | undefined;
  #greeting: QmpGreeting | undefined;

  private constructor(stream: Duplex, options: QmpClientOptions) {
    this.#stream = stream;
    this.#reader = new QmpJsonReader(options.limits);
    this.#historyMax = options.eventHistory ?? 1000;
    stream.on("data", (chunk: Buffer | string) => {
      this.#reader.push(typeof chunk === "string" ? Buffer.from(chunk) : chunk, (m) => {
        if (m.ok) this.#onMessage(m.value);
        else this.#fail(new QmpConnectionError("ERR_QMP_PROTOCOL", `unparsable QMP output: ${m.error}`));
        return true;
      });
    });
    stream.on("error", (e) =>
      this.#fail(new QmpConnectionError("ERR_QMP_DISCONNECTED", e.message, { cause: e })),
    );
    stream.on("close", () =>
      this.#fail(new QmpConnectionError("ERR_QMP_DISCONNECTED", "QMP connection closed")),
    );
  }

  /**
   * Connects, reads the greeting and (unless `negotiate: false`) negotiates capabilities.
   * @throws {QmpConnectionError} ERR_QMP_TIMEOUT, ERR_QMP_DISCONNECTED or ERR_QMP_PROTOCOL
   * @throws {QmpError} when `qmp_capabilities` is refused
   */
  static async connect(target: QmpConnectTarget, options: QmpClientOptions = {}): Promise<QmpClient> {
    const timeoutMs = options.timeoutMs ?? 10_000;
    const stream: Duplex =
      "stream" in target
        ? target.stream
        : "path" in target
          ? netConnect(target.path)
          : netConnect(target.port, target.host ?? "127.0.0.1");
    const client = new QmpClient(stream, options);
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(
        () => reject(new QmpConnectionError("ERR_QMP_TIMEOUT", `no QMP greeting within ${timeoutMs} ms`)),
        timeoutMs,
      );
    });
    try {
      const greeting = await Promise.race([client.#waitGreeting(), timeout]);
      client.#greeting = greeting;
      if (options.negotiate !== false) {
        const args = options.enable === undefined ? undefined : { enable: options.enable };
        await Promise.race([client.execute("qmp_capabilities", args), timeout]);
      }
      return client;
    } catch (e) {
      client.#stream.destroy();
      client.#fail(new QmpConnectionError("ERR_QMP_CLOSED", "QMP connect failed"));
      throw e;
    } finally {
      clearTimeout(timer);
    }
  }

  /** The greeting the server sent. */
  get greeting(): QmpGreeting {
    return this.#greeting as QmpGreeting;
  }

  /** True once the connection is gone (closed by either side). */
  get isClosed(): boolean {
    return this.#failure !== undefined;
  }

  #waitGreeting(): Promise<QmpGreeting> {
    return new Promise((resolve, reject) => {
      if (this.#failure) {
        reject(this.#failure);
        return;
      }
      this.#onGreeting = (g) => {
        const qmp = isObject(g) ? g.QMP : undefined;
        if (!isObject(qmp) || !isObject(qmp.version) || !Array.isArray(qmp.capabilities))
          reject(new QmpConnectionError("ERR_QMP_PROTOCOL", `not a QMP greeting: ${encodeQmpJson(g)}`));
        else
          resolve({
            version: qmp.version as unknown as QmpVersionInfo,
            capabilities: qmp.capabilities as string[],
          });
      };
      this.#waiters.add({
        offer: noOffer,
        fail: (e) => {
          reject(e);
        },
      });
    });
  }

  /**
   * Runs a command; resolves with its `return` value. Many calls may be in flight; answers are matched by `id`.
   * @throws {QmpError} with the class and desc the server answered
   * @throws {QmpConnectionError} when the connection fails or closes first, or on time-out
   */
  execute<T = unknown>(
    command: string,
    args?: Record<string, unknown>,
    options: QmpExecuteOptions = {},
  ): Promise<T> {
    if (this.#failure) return Promise.reject(this.#failure);
    const id = this.#nextId++;
    const request = args === undefined ? { execute: command, id } : { execute: command, arguments: args, id };
    return new Promise<T>((resolve, reject) => {
      const pending: Pending = { resolve: resolve as (v: unknown) => void, reject, timer: undefined };
      if (options.timeoutMs !== undefined) {
        pending.timer = setTimeout(() => {
          this.#pending.delete(id);
          reject(
            new QmpConnectionError(
              "ERR_QMP_TIMEOUT",
              `${command} got no answer within ${options.timeoutMs} ms`,
            ),
          );
        }, options.timeoutMs);
      }
      this.#pending.set(id, pending);
      this.#stream.write(`${encodeQmpJson(request)}\n`);
    });
  }

  /** The sequence number of the last event received so far (0 before any): pass it as `since`. */
  eventMark(): number {
    return this.#seq;
  }

  /**
   * Resolves with the next event called `name` (matching `where`), optionally searching the buffered events
   * received after `since` first. Also callable as `waitEvent(name, where, timeoutMs?)`.
   * @example
   * await qmp.waitEvent("BLOCK_JOB_COMPLETED", (d) => d.device === "m0", 30_000);
   * @throws {QmpConnectionError} ERR_QMP_TIMEOUT, or when the connection closes first
   */
  waitEvent<D = Record<string, unknown>>(
    name: string,
    options?: QmpWaitEventOptions<D>,
  ): Promise<QmpEvent<D>>;
  /** The next event called `name` whose data satisfies `where`, within `timeoutMs` (default: forever). */
  waitEvent<D = Record<string, unknown>>(
    name: string,
    where: (data: D, event: QmpEvent<D>) => boolean,
    timeoutMs?: number,
  ): Promise<QmpEvent<D>>;
  waitEvent<D = Record<string, unknown>>(
    name: string,
    optionsOrWhere: QmpWaitEventOptions<D> | ((data: D, event: QmpEvent<D>) => boolean) = {},
    timeoutMs?: number,
  ): Promise<QmpEvent<D>> {
    const options: QmpWaitEventOptions<D> =
      typeof optionsOrWhere === "function"
        ? timeoutMs === undefined
          ? { where: optionsOrWhere }
          : { where: optionsOrWhere, timeoutMs }
        : optionsOrWhere;
    const matches = (e: QmpEvent): boolean =>
      e.event === name && (options.where === undefined || options.where(e.data as D, e as QmpEvent<D>));
    if (options.since !== undefined) {
      for (const e of this.#history)
        if (e.seq > options.since && matches(e)) return Promise.resolve(e as QmpEvent<D>);
    }
    if (this.#failure) return Promise.reject(this.#failure);
    return new Promise((resolve, reject) => {
      let timer: NodeJS.Timeout | undefined;
      const waiter: Waiter = {
        offer: (e) => {
          if (!matches(e)) return false;
          clearTimeout(timer);
          this.#waiters.delete(waiter);
          resolve(e as QmpEvent<D>);
          return true;
        },
        fail: (err) => {
          clearTimeout(timer);
          reject(err);
        },
      };
      if (options.timeoutMs !== undefined) {
        timer = setTimeout(() => {
          this.#waiters.delete(waiter);
          reject(
            new QmpConnectionError("ERR_QMP_TIMEOUT", `no ${name} event within ${options.timeoutMs} ms`),
          );
        }, options.timeoutMs);
      }
      this.#waiters.add(waiter);
    });
  }

  /**
   * The events as an async iterator, from now on (or from `since`). Ends when the connection closes;
   * `break` unsubscribes.
   */
  events(options: QmpEventsOptions = {}): AsyncIterableIterator<QmpEvent> {
    const max = options.maxBuffered ?? 10_000;
    const queue: QmpEvent[] = [];
    if (options.since !== undefined) for (const e of this.#history) if (e.seq > options.since) queue.push(e);
    let wake: (() => void) | undefined;
    let error: Error | undefined;
    let done = false;
    const waiter: Waiter = {
      offer: (e) => {
        if (queue.length >= max) {
          error ??= new QmpConnectionError("ERR_QMP_EVENT_OVERFLOW", `more than ${max} unread events`);
          this.#waiters.delete(waiter);
        } else queue.push(e);
        wake?.();
        return false;
      },
      fail: (e) => {
        done = true;
        if (!isQmpConnectionError(e, "ERR_QMP_CLOSED") && !isQmpConnectionError(e, "ERR_QMP_DISCONNECTED"))
          error ??= e;
        wake?.();
      },
    };
    if (this.#failure) done = true;
    else this.#waiters.add(waiter);
    const finish = (): Promise<IteratorResult<QmpEvent>> => {
      done = true;
      this.#waiters.delete(waiter);
      queue.length = 0;
      return Promise.resolve({ value: undefined, done: true });
    };
    const iterator: AsyncIterableIterator<QmpEvent> = {
      next: async (): Promise<IteratorResult<QmpEvent>> => {
        for (;;) {
          const e = queue.shift();
          if (e !== undefined) return { value: e, done: false };
          if (error !== undefined) {
            const err = error;
            error = undefined;
            done = true;
            this.#waiters.delete(waiter);
            throw err;
          }
          if (done) return { value: undefined, done: true };
          await new Promise<void>((resolve) => {
            wake = resolve;
          });
          wake = undefined;
        }
      },
      return: finish,
      [Symbol.asyncIterator]: () => iterator,
    };
    return iterator;
  }

  /** Closes the connection; pending calls reject with ERR_QMP_CLOSED. Idempotent, same promise each time. */
  close(): Promise<void> {
    this.#closing ??= new Promise<void>((resolve) => {
      this.#fail(new QmpConnectionError("ERR_QMP_CLOSED", "QMP client closed"));
      if (this.#stream.destroyed) {
        resolve();
        return;
      }
      this.#stream.once("close", () => resolve());
      // Nothing more is expected from the peer: flush what was written, then drop the connection.
      this.#stream.end(() => this.#stream.destroy());
      setTimeout(() => this.#stream.destroy(), 1000).unref();
    });
    return this.#closing;
  }

  /** Same as {@link QmpClient.close}. */
  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }

  #onMessage(msg: QmpJsonValue): void {
    if (this.#onGreeting) {
      const g = this.#onGreeting;
      this.#onGreeting = undefined;
      for (const w of this.#waiters) if (w.offer === noOffer) this.#waiters.delete(w);
      g(msg);
      return;
    }
    if (!isObject(msg)) return;
    if (typeof msg.event === "string") {
      const ts = isObject(msg.timestamp) ? msg.timestamp : {};
      const event: QmpEvent = {
        event: msg.event,
        data: (isObject(msg.data) ? msg.data : {}) as Record<string, unknown>,
        timestamp: { seconds: Number(ts.seconds ?? -1), microseconds: Number(ts.microseconds ?? -1) },
        seq: ++this.#seq,
      };
      this.#history.push(event);
      if (this.#history.length > this.#historyMax) this.#history.shift();
      for (const w of [...this.#waiters]) w.offer(event);
      return;
    }
    const id = msg.id;
    if (typeof id !== "number") return; // not ours (no id: an answer to unparsable input)
    const pending = this.#pending.get(id);
    if (pending === undefined) return;
    this.#pending.delete(id);
    clearTimeout(pending.timer);
    if (Object.hasOwn(msg, "return")) pending.resolve(msg.return);
    else if (isObject(msg.error)) {
      const cls = String(msg.error.class);
      const errorClass: QmpErrorClass = (QMP_ERROR_CLASSES as readonly string[]).includes(cls)
        ? (cls as QmpErrorClass)
        : "GenericError";
      pending.reject(new QmpError(errorClass, String(msg.error.desc)));
    } else
      pending.reject(new QmpConnectionError("ERR_QMP_PROTOCOL", `bad QMP answer: ${encodeQmpJson(msg)}`));
  }

  #fail(error: QmpConnectionError): void {
    if (this.#failure) return;
    this.#failure = error;
    const pending = [...this.#pending.values()];
    this.#pending.clear();
    for (const p of pending) {
      clearTimeout(p.timer);
      p.reject(error);
    }
    const waiters = [...this.#waiters];
    this.#waiters.clear();
    for (const w of waiters) w.fail(error);
    if (!this.#stream.destroyed && error.code !== "ERR_QMP_CLOSED") this.#stream.destroy();
  }
}
