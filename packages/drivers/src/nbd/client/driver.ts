/**
 * The `nbd` protocol driver: a block node backed by an export of an NBD server, over {@link NbdClient}.
 * Options are QEMU's `BlockdevOptionsNbd`: `server` (flat `SocketAddress`, `inet` or `unix`), `export`,
 * `x-dirty-bitmap`, `reconnect-delay`, `open-timeout`, `tls-creds` (the id of client credentials in the
 * driver's credentials map, {@link tlsCredentials} by default; see ../tls.ts) and `tls-hostname`.
 *
 * blk's own `x-multi-conn` (default 1, as QEMU 7.2's nbd driver, which has one connection) opens up to
 * that many connections when the server advertises `NBD_FLAG_CAN_MULTI_CONN` (one otherwise): requests
 * go round-robin over the live ones, a flush goes to all of them (MULTI_CONN makes one enough; all is
 * cheap and does not lean on the server getting MULTI_CONN right), and each reconnects on its own.
 * Default 1 because one connection with 16 requests in flight already keeps a local server busy; more
 * help servers that work one request at a time per connection, or links with high latency.
 *
 * Mapping to the node's requests (as QEMU's nbd driver does): write-zeroes sends NO_HOLE unless the caller
 * allows unmapping and FAST_ZERO for `noFallback`; FUA is sent when the server supports it, else the write
 * is followed by a flush; discard is a TRIM when supported (a no-op otherwise, discard is advisory);
 * block status reads the `base:allocation` context (HOLE bit clear → data, ZERO bit → zero), or, with
 * `x-dirty-bitmap=CONTEXT`, that context's bits read the same way instead (QEMU's trick for reading
 * a dirty bitmap through `qemu-img map`: dirty areas show as holes).
 */
import {
  BlkError,
  type BlockDriver,
  BlockDriverBase,
  type BlockDriverInfo,
  type BlockStatusExtent,
  type FlushFlags,
  type OpenContext,
  type WriteFlags,
  type ZeroFlags,
} from "@blk/core";
import {
  expectEnum,
  expectInt,
  expectObject,
  expectString,
  rejectUnexpected,
} from "../../registry/options.ts";
import { META_BASE_ALLOCATION, NBD_STATE } from "../protocol/index.ts";
import type { TlsCreds } from "../tls.ts";
import { NbdClient, type NbdClientOptions, type NbdServerAddress } from "./client.ts";
import { formatNbdUri } from "./uri.ts";

/** `BlockdevOptionsNbd` (QEMU's names). */
export interface NbdOptions {
  /** Where the server listens (`{type: "unix", path}` or `{type: "inet", host, port}`). */
  server: NbdServerAddress;
  /** Export name (default `""`). */
  export?: string;
  /** Id of client TLS credentials (`tls-creds-psk`/`tls-creds-x509` objects): STARTTLS, then TLS only. */
  "tls-creds"?: string;
  /** Host name an x509 server certificate must name (default: `server.host`; needed on unix sockets). */
  "tls-hostname"?: string;
  /** A metadata context (`qemu:dirty-bitmap:NAME`, `qemu:allocation-depth`) read instead of `base:allocation`. */
  "x-dirty-bitmap"?: string;
  /** Seconds requests wait for a reconnect after the connection is lost (default 0: fail at once). */
  "reconnect-delay"?: number;
  /** Seconds `open` keeps retrying to connect (default 0: one attempt). */
  "open-timeout"?: number;
  /** blk extension: connections to open when the server allows multi-conn (1–16, default 1). */
  "x-multi-conn"?: number;
}

/** Settings of {@link makeNbdDriver} that are not QEMU options. */
export interface NbdDriverConfig {
  /** Requests in flight per connection (default 16). */
  maxInFlight?: number;
  /** Milliseconds for one connection attempt plus handshake (default 30 000). */
  connectTimeoutMs?: number;
  /** Where `tls-creds` ids are looked up (default {@link tlsCredentials}; any `get` will do). */
  tlsCreds?: { get(id: string): TlsCreds | undefined };
}

/**
 * The TLS credentials the default {@link nbdDriver} resolves `tls-creds` against (id → credentials),
 * as the throttle driver's `throttleGroups`: an application registers its objects here.
 */
export const tlsCredentials: Map<string, TlsCreds> = new Map();

const INET_KEYS = ["type", "host", "port", "numeric", "to", "ipv4", "ipv6", "keep-alive", "mptcp"] as const;
const UNIX_KEYS = ["type", "path", "abstract", "tight"] as const;
const NBD_KEYS = [
  "server",
  "export",
  "tls-creds",
  "tls-hostname",
  "x-dirty-bitmap",
  "reconnect-delay",
  "open-timeout",
  "x-multi-conn",
] as const;

/** Most connections `x-multi-conn` may ask for. */
export const NBD_MAX_MULTI_CONN = 16;

function parseServer(value: unknown): NbdServerAddress {
  if (value === undefined) throw new BlkError("EINVAL", "Parameter 'server' is missing");
  const s = expectObject(value, "server");
  const type = expectEnum(s, "type", ["inet", "unix", "vsock", "fd"] as const);
  if (type === undefined) throw new BlkError("EINVAL", "Parameter 'server.type' is missing");
  if (type === "inet") {
    const host = expectString(s, "host", true);
    const port = expectString(s, "port", true);
    rejectUnexpected(s, INET_KEYS);
    return { type, host, port };
  }
  if (type === "unix") {
    const path = expectString(s, "path", true);
    rejectUnexpected(s, UNIX_KEYS);
    return { type, path };
  }
  throw new BlkError("ENOTSUP", `NBD server address type '${type}' is not supported`);
}

/** Validates `nbd` options with QEMU's wording. */
export const nbdSchema: { parse(value: unknown): NbdOptions } = {
  parse(value: unknown): NbdOptions {
    const o = expectObject(value ?? {});
    const out: NbdOptions = { server: parseServer(o.server) };
    for (const key of ["export", "tls-creds", "tls-hostname", "x-dirty-bitmap"] as const) {
      const v = expectString(o, key, false);
      if (v !== undefined) out[key] = v;
    }
    for (const key of ["reconnect-delay", "open-timeout"] as const) {
      const v = expectInt(o, key, 0);
      if (v !== undefined) out[key] = v;
    }
    const conns = expectInt(o, "x-multi-conn", 0);
    if (conns !== undefined) {
      if (conns < 1 || conns > NBD_MAX_MULTI_CONN)
        throw new BlkError(
          "EINVAL",
          `Parameter 'x-multi-conn' expects a value between 1 and ${NBD_MAX_MULTI_CONN}`,
        );
      out["x-multi-conn"] = conns;
    }
    rejectUnexpected(o, NBD_KEYS);
    return out;
  },
};

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** A failure to reach the server (worth retrying), as opposed to a refusal (unknown export, TLS…). */
const isConnectFailure = (e: unknown): boolean =>
  e instanceof BlkError && (e.code === "EIO" || e.code === "ETIMEDOUT");

/** Connects, retrying failed connection attempts until `deadline` (ms since epoch; 0 = one attempt). */
async function connectUntil(options: NbdClientOptions, deadline: number): Promise<NbdClient> {
  let delay = 100;
  for (;;) {
    try {
      return await NbdClient.connect(options);
    } catch (e) {
      if (!isConnectFailure(e) || Date.now() + delay > deadline) throw e;
      await sleep(delay);
      delay = Math.min(delay * 2, 1000);
    }
  }
}

/** The open state of an `nbd` node. */
export class NbdState extends BlockDriverBase {
  readonly options: NbdOptions;
  /** The metadata context block status reads (`base:allocation` or `x-dirty-bitmap`). */
  readonly statusContext: string;
  /** One connection per slot (several with `x-multi-conn`); a slot's client is replaced on reconnect. */
  readonly #clients: NbdClient[];
  readonly #clientOptions: NbdClientOptions;
  readonly #reconnecting = new Map<number, Promise<NbdClient>>();
  #next = 0;
  /** @internal Credentials referenced while open. */
  tlsCreds: TlsCreds | undefined;

  /** @internal Use {@link nbdDriver}.open. */
  constructor(
    clients: NbdClient | readonly NbdClient[],
    options: NbdOptions,
    clientOptions: NbdClientOptions,
  ) {
    const all = Array.isArray(clients) ? [...clients] : [clients as NbdClient];
    const client = all[0];
    if (client === undefined) throw new BlkError("EINVAL", "NbdState needs a connection");
    super({ requestAlignment: client.minimumBlockSize, maxTransfer: client.maxPayload });
    this.#clients = all;
    this.options = options;
    this.#clientOptions = clientOptions;
    this.statusContext = options["x-dirty-bitmap"] ?? META_BASE_ALLOCATION;
  }

  /** The URI QEMU gives as the node's filename (`nbd+unix://?socket=PATH`, `nbd://HOST:PORT/EXPORT`). */
  get filename(): string {
    const s = this.options.server;
    const server = s.type === "unix" ? s : { type: "inet" as const, host: s.host, port: String(s.port) };
    const name = this.options.export ?? "";
    return formatNbdUri(name === "" ? { server } : { server, export: name });
  }

  /** The first connection (replaced after a reconnect). */
  get client(): NbdClient {
    return this.#clients[0] as NbdClient;
  }

  /** Every connection (one unless `x-multi-conn` and the server allows it). */
  get clients(): readonly NbdClient[] {
    return this.#clients;
  }

  /**
   * The next slot round-robin. Without `reconnect-delay`, dead connections are skipped while a live one
   * remains; with it, a dead one is reconnected by the request that lands on it.
   */
  #pick(): number {
    const n = this.#clients.length;
    const skipDead = (this.options["reconnect-delay"] ?? 0) === 0;
    for (let k = 0; skipDead && k < n; k++) {
      const i = (this.#next + k) % n;
      if (this.#clients[i]?.error === undefined) {
        this.#next = (i + 1) % n;
        return i;
      }
    }
    const i = this.#next;
    this.#next = (i + 1) % n;
    return i;
  }

  /** FUA is always honoured: natively, or by a flush after the write when the server lacks FUA. */
  protected override supportsFua(): boolean {
    return true;
  }

  /**
   * Runs `fn` on the connection; when the connection is lost and `reconnect-delay` is set, reconnects
   * (one shared attempt, for up to that many seconds) and runs `fn` once more on the new connection.
   */
  async #io<T>(fn: (c: NbdClient) => Promise<T>, slot: number = this.#pick()): Promise<T> {
    const c = this.#clients[slot] as NbdClient;
    try {
      if (c.error !== undefined) throw c.error;
      return await fn(c);
    } catch (e) {
      const delay = this.options["reconnect-delay"] ?? 0;
      if (delay === 0 || c.error === undefined || this.closed) throw e;
      const fresh = await this.#reconnect(slot, c, delay).catch(() => {
        throw e;
      });
      return fn(fresh);
    }
  }

  #reconnect(slot: number, lost: NbdClient, delaySeconds: number): Promise<NbdClient> {
    const current = this.#clients[slot] as NbdClient;
    if (current !== lost) return Promise.resolve(current);
    let p = this.#reconnecting.get(slot);
    if (p === undefined) {
      p = (async () => {
        try {
          const c = await connectUntil(this.#clientOptions, Date.now() + delaySeconds * 1000);
          if (c.size !== lost.size) {
            await c.close();
            throw new BlkError("EIO", `NBD export size changed from ${lost.size} to ${c.size} on reconnect`);
          }
          if (this.closed) {
            await c.close();
            throw new BlkError("ESHUTDOWN", "NBD node is closed");
          }
          this.#clients[slot] = c;
          return c;
        } finally {
          this.#reconnecting.delete(slot);
        }
      })();
      this.#reconnecting.set(slot, p);
    }
    return p;
  }

  protected override async _read(offset: number, buf: Uint8Array): Promise<void> {
    await this.#io((c) => c.readInto(offset, buf));
  }

  protected override async _write(offset: number, data: Uint8Array, flags: WriteFlags): Promise<void> {
    await this.#io(async (c) => {
      const fua = flags.fua === true;
      await c.write(offset, data, { fua: fua && c.canFua });
      if (fua && !c.canFua && c.canFlush) await c.flush();
    });
  }

  protected override async _writeZeroes(offset: number, bytes: number, flags: ZeroFlags): Promise<void> {
    if (!this.client.canZero) {
      await super._writeZeroes(offset, bytes, flags);
      return;
    }
    await this.#io(async (c) => {
      const noFallback = flags.noFallback === true;
      if (noFallback && !c.canFastZero) {
        throw new BlkError("ENOTSUP", "NBD server does not support fast zero", { offset });
      }
      const fua = flags.fua === true;
      await c.writeZeroes(offset, bytes, {
        noHole: flags.mayUnmap !== true,
        fastZero: noFallback,
        fua: fua && c.canFua,
      });
      if (fua && !c.canFua && c.canFlush) await c.flush();
    });
  }

  protected override async _discard(offset: number, bytes: number): Promise<void> {
    if (!this.client.canTrim) return;
    await this.#io((c) => c.trim(offset, bytes));
  }

  protected override async _flush(_flags: FlushFlags): Promise<void> {
    if (!this.client.canFlush) return;
    await Promise.all(this.#clients.map((_, slot) => this.#io((c) => c.flush(), slot)));
  }

  protected override async _blockStatus(offset: number, bytes: number): Promise<BlockStatusExtent[]> {
    if (!this.client.contexts.has(this.statusContext)) {
      return [{ offset, length: bytes, data: true, zero: false, allocated: true, hostOffset: offset }];
    }
    const status = await this.#io((c) => c.blockStatus(offset, bytes));
    const end = offset + bytes;
    const out: BlockStatusExtent[] = [];
    for (const e of status.get(this.statusContext) ?? []) {
      if (e.offset >= end) break;
      const length = Math.min(e.offset + e.length, end) - e.offset;
      const data = (e.flags & NBD_STATE.HOLE) === 0;
      const zero = (e.flags & NBD_STATE.ZERO) !== 0;
      out.push({ offset: e.offset, length, data, zero, allocated: data || zero, hostOffset: e.offset });
    }
    if (out.length === 0) throw new BlkError("EIO", "NBD server sent no extent for the requested context");
    return out;
  }

  protected override async _getLength(): Promise<number> {
    return this.client.size;
  }

  protected override async _info(): Promise<BlockDriverInfo> {
    // QEMU's nbd driver has no get_info.
    return { unsupported: true };
  }

  protected override async _close(): Promise<void> {
    await Promise.all([...this.#reconnecting.values()].map((p) => p.catch(() => undefined)));
    await Promise.all(this.#clients.map((c) => c.close()));
    this.tlsCreds?.unref();
    this.tlsCreds = undefined;
  }
}

/** Builds an `nbd` driver with non-default connection settings ({@link nbdDriver} uses the defaults). */
export function makeNbdDriver(config: NbdDriverConfig = {}): BlockDriver<NbdOptions> {
  return {
    format: "nbd",
    kind: "protocol",
    schema: nbdSchema,
    async open(options: NbdOptions, ctx: OpenContext): Promise<NbdState> {
      const o = nbdSchema.parse(options);
      let tls: NbdClientOptions["tls"];
      const credsId = o["tls-creds"];
      if (credsId !== undefined) {
        const creds = (config.tlsCreds ?? tlsCredentials).get(credsId);
        if (creds === undefined) throw new BlkError("EINVAL", `No TLS credentials with id '${credsId}'`);
        creds.checkEndpoint("client");
        const hostname = o["tls-hostname"];
        tls = hostname === undefined ? { creds } : { creds, hostname };
      }
      const clientOptions: NbdClientOptions = {
        ...(tls === undefined ? {} : { tls }),
        server: o.server,
        export: o.export ?? "",
        metaContexts: [o["x-dirty-bitmap"] ?? META_BASE_ALLOCATION],
        ...(config.maxInFlight === undefined ? {} : { maxInFlight: config.maxInFlight }),
        ...(config.connectTimeoutMs === undefined ? {} : { connectTimeoutMs: config.connectTimeoutMs }),
      };
      const openTimeout = o["open-timeout"] ?? 0;
      const client = await connectUntil(clientOptions, openTimeout > 0 ? Date.now() + openTimeout * 1000 : 0);
      try {
        const bitmap = o["x-dirty-bitmap"];
        if (bitmap !== undefined && !client.contexts.has(bitmap)) {
          throw new BlkError("EINVAL", `NBD server does not offer the metadata context '${bitmap}'`);
        }
        if (client.readOnly && !ctx.readOnly && !ctx.autoReadOnly) {
          throw new BlkError("EPERM", "NBD export is read-only");
        }
      } catch (e) {
        await client.close();
        throw e;
      }
      const clients = [client];
      const want = o["x-multi-conn"] ?? 1;
      if (want > 1 && client.canMultiConn) {
        // Extra connections are a bonus: the ones the server refuses (max-connections…) are done without.
        const extra = await Promise.allSettled(
          Array.from({ length: want - 1 }, () => NbdClient.connect(clientOptions)),
        );
        for (const r of extra) if (r.status === "fulfilled") clients.push(r.value);
      }
      const state = new NbdState(clients, o, clientOptions);
      if (tls !== undefined) {
        tls.creds.ref();
        state.tlsCreds = tls.creds;
      }
      return state;
    },
  };
}

/** The `nbd` protocol driver (QEMU's `nbd` blockdev driver). */
export const nbdDriver: BlockDriver<NbdOptions> = makeNbdDriver();

/**
 * Adds {@link nbdDriver} to a registry (e.g. `driverRegistry` of `@blk/drivers`).
 * @throws {BlkError} EEXIST when an `nbd` driver is registered already
 */
export function registerNbd(registry: {
  register(driver: BlockDriver<NbdOptions>, options?: { replace?: boolean }): void;
}): void {
  registry.register(nbdDriver);
}
