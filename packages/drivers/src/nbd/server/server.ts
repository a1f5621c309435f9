/**
 * NbdServer: serves {@link NbdExport}s over unix sockets and TCP. Exports are added and removed at run
 * time (what `block-export-add` / `block-export-del` wrap); `close()` stops listening and drops every
 * client (what `nbd-server-stop` wraps).
 */
import { once } from "node:events";
import { createServer, type Server, type Socket } from "node:net";
import { BlkError } from "@blk/core";
import { alignedBuffer } from "../../file/index.ts";
import type { TlsCreds } from "../tls.ts";
import { NbdConnection, type NbdConnectionHost, type NbdConnectionInfo } from "./connection.ts";
import { NbdExport, type NbdExportOptions } from "./export.ts";
import { BufferPool, POOL_HEADROOM } from "./pool.ts";

/** Bytes one socket read may return (the buffer is shared by every connection of a server). */
const READ_BUFFER_SIZE = 256 * 1024;

/** Where to listen. */
export type NbdListenAddress = { type: "unix"; path: string } | { type: "inet"; host: string; port: number };

/** Options of {@link NbdServer}. */
export interface NbdServerOptions {
  /** Most clients connected at once; more are closed on arrival. 0 = unlimited (default). */
  maxConnections?: number;
  /** Requests of one client executing at once; beyond that its socket is not read (default 16). */
  maxInFlight?: number;
  /** Options one client may send before it is dropped (default 1024). */
  maxOptions?: number;
  /** A client still negotiating after this many milliseconds is dropped (default 10000; 0 = never). */
  handshakeTimeoutMs?: number;
  /** Diagnostics (dropped clients, failed requests). */
  log?: (message: string) => void;
  /**
   * TLS (`NBD_OPT_STARTTLS`) with server credentials. `required` (default true, QEMU's only mode) refuses
   * every option but STARTTLS and ABORT before TLS with `NBD_REP_ERR_TLS_REQD`; false lets plaintext
   * clients in too. The credentials are referenced (see {@link TlsCreds.users}) until `close()`.
   */
  tls?: { creds: TlsCreds; required?: boolean };
}

/** Options of {@link NbdServer.removeExport}. */
export interface NbdRemoveExportOptions {
  /** `safe` (default) refuses while clients use the export; `hard` disconnects them. */
  mode?: "safe" | "hard";
}

/**
 * An NBD server (fixed newstyle; see the package README for the supported options and commands).
 * @example
 * const server = new NbdServer();
 * server.addExport({ name: "disk", node, writable: true });
 * await server.listen({ type: "unix", path: "/tmp/nbd.sock" });
 * // nbdinfo 'nbd+unix:///disk?socket=/tmp/nbd.sock'
 * await server.close();
 */
export class NbdServer implements NbdConnectionHost {
  readonly maxConnections: number;
  readonly maxInFlight: number;
  readonly maxOptions: number;
  readonly handshakeTimeoutMs: number;
  readonly tls: { creds: TlsCreds; required: boolean } | undefined;
  /** @internal Payload buffers shared by the connections. */
  readonly bufferPool: BufferPool = new BufferPool();
  /** @internal What the sockets this server accepts read into (allocated on the first connection). */
  get readBuffer(): Uint8Array {
    this.#readBuffer ??= alignedBuffer(READ_BUFFER_SIZE, POOL_HEADROOM);
    return this.#readBuffer;
  }
  #readBuffer: Uint8Array | undefined;
  #log: (message: string) => void;
  #exports = new Map<string, NbdExport>();
  #listeners: Server[] = [];
  #conns = new Set<NbdConnection>();
  /** Closed connections whose requests are still running. */
  #draining = new Set<NbdConnection>();
  #closing: Promise<void> | undefined;

  constructor(options: NbdServerOptions = {}) {
    this.maxConnections = options.maxConnections ?? 0;
    this.maxInFlight = options.maxInFlight ?? 16;
    this.maxOptions = options.maxOptions ?? 1024;
    this.handshakeTimeoutMs = options.handshakeTimeoutMs ?? 10_000;
    this.#log = options.log ?? (() => {});
    if (!Number.isInteger(this.maxInFlight) || this.maxInFlight < 1) {
      throw new BlkError("EINVAL", "maxInFlight must be a positive integer");
    }
    const tls = options.tls;
    if (tls !== undefined) {
      tls.creds.checkEndpoint("server");
      tls.creds.ref();
      this.tls = { creds: tls.creds, required: tls.required ?? true };
    }
  }

  /** True once {@link NbdServer.close} was called. */
  get shuttingDown(): boolean {
    return this.#closing !== undefined;
  }

  /** @internal */
  log(message: string): void {
    this.#log(message);
  }

  /** @internal */
  findExport(name: string): NbdExport | undefined {
    return this.#exports.get(name);
  }

  /** @internal */
  exportList(): readonly NbdExport[] {
    return [...this.#exports.values()];
  }

  /** The exports, in the order they were added. */
  get exports(): readonly NbdExport[] {
    return this.exportList();
  }

  /** State of every connected client. */
  connections(): NbdConnectionInfo[] {
    return [...this.#conns].map((c) => c.info());
  }

  /**
   * Exports a node. The node gets an unnamed BlockBackend parent holding consistent-read (and write when
   * `writable`); exported bitmaps are marked busy until the export is removed.
   * @throws {BlkError} EEXIST for a duplicate name; ENOENT for a missing bitmap; EPERM for a writable
   * export of a read-only node or on a permission conflict; EINVAL for bad options
   */
  addExport(options: NbdExportOptions): NbdExport {
    if (this.#closing) throw new BlkError("ESHUTDOWN", "NBD server is shut down");
    const name = options.name ?? options.node.nodeName;
    if (this.#exports.has(name))
      throw new BlkError("EEXIST", `NBD server already has export named '${name}'`);
    const exp = new NbdExport(options);
    this.#exports.set(exp.name, exp);
    return exp;
  }

  /**
   * Removes an export: no new client can open it at once; resolves when its clients are gone and the
   * node is released.
   * @throws {BlkError} ENOENT for an unknown export; EBUSY in `safe` mode while clients use it
   */
  async removeExport(name: string, options: NbdRemoveExportOptions = {}): Promise<void> {
    const exp = this.#exports.get(name);
    if (exp === undefined) throw new BlkError("ENOENT", `Export '${name}' is not found`);
    const users = [...this.#conns].filter((c) => c.export === exp);
    if ((options.mode ?? "safe") === "safe" && users.some((c) => c.active)) {
      throw new BlkError("EBUSY", `export '${name}' still in use`);
    }
    this.#exports.delete(name);
    for (const c of users) c.destroy();
    const drains = [...users, ...[...this.#draining].filter((c) => c.export === exp)];
    await Promise.all(drains.map((c) => c.idle()));
    exp._release();
  }

  /**
   * Starts listening (may be called several times for several addresses).
   * @returns the bound address (for TCP port 0, the chosen port)
   */
  async listen(address: NbdListenAddress): Promise<NbdListenAddress> {
    if (this.#closing) throw new BlkError("ESHUTDOWN", "NBD server is shut down");
    // Without TLS, accepted sockets are re-created to read into the connection's buffers, which needs
    // them paused until then (a TLS upgrade takes over the socket's reads itself: those stay as they are).
    const adopt = this.tls === undefined;
    const srv = createServer({ allowHalfOpen: true, pauseOnConnect: adopt }, (s) => this.#accept(s, adopt));
    srv.on("error", (e) => this.#log(`listener error: ${e.message}`));
    const listening = once(srv, "listening");
    const failed = once(srv, "error").then(([e]) => {
      throw e;
    });
    if (address.type === "unix") srv.listen(address.path);
    else srv.listen(address.port, address.host);
    await Promise.race([listening, failed]);
    this.#listeners.push(srv);
    const a = srv.address();
    if (address.type === "inet" && a !== null && typeof a === "object") {
      return { type: "inet", host: a.address, port: a.port };
    }
    return address;
  }

  /** Serves a connected socket (accepted elsewhere, or one end of a socket pair in tests). */
  handleSocket(socket: Socket): void {
    this.#accept(socket, false);
  }

  #accept(socket: Socket, adopt: boolean): void {
    if (this.#closing || (this.maxConnections > 0 && this.#conns.size >= this.maxConnections)) {
      socket.on("error", () => {});
      socket.destroy();
      return;
    }
    this.#conns.add(new NbdConnection(this, socket, adopt));
  }

  /** @internal */
  closed(conn: NbdConnection): void {
    this.#conns.delete(conn);
    this.#draining.add(conn);
    void conn.idle().then(() => this.#draining.delete(conn));
  }

  /** Drops every client (exports stay); resolves when their in-flight requests have settled. */
  async closeConnections(): Promise<void> {
    const all = [...this.#conns];
    for (const c of all) c.destroy();
    await Promise.all([...all, ...this.#draining].map((c) => c.idle()));
  }

  /** Stops listening, drops every client and removes every export. Idempotent. */
  close(): Promise<void> {
    this.#closing ??= (async () => {
      const ls = this.#listeners.splice(0);
      const closed = Promise.all(ls.map((l) => new Promise<void>((r) => l.close(() => r()))));
      await this.closeConnections();
      await closed;
      for (const exp of this.#exports.values()) exp._release();
      this.#exports.clear();
      this.tls?.creds.unref();
      this.bufferPool.clear();
    })();
    return this.#closing;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}
