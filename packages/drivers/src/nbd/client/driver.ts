/**
 * The `nbd` protocol driver: a block node backed by an export of an NBD server, over {@link NbdClient}.
 * Options are QEMU's `BlockdevOptionsNbd`: `server` (flat `SocketAddress`, `inet` or `unix`), `export`,
 * `x-dirty-bitmap`, `reconnect-delay`, `open-timeout`; `tls-creds` is refused with ENOTSUP for now.
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
import { NbdClient, type NbdClientOptions, type NbdServerAddress } from "./client.ts";

/** `BlockdevOptionsNbd` (QEMU's names). */
export interface NbdOptions {
  /** Where the server listens (`{type: "unix", path}` or `{type: "inet", host, port}`). */
  server: NbdServerAddress;
  /** Export name (default `""`). */
  export?: string;
  /** TLS credentials object id: not supported yet (open fails with ENOTSUP). */
  "tls-creds"?: string;
  /** TLS host name (only meaningful with `tls-creds`). */
  "tls-hostname"?: string;
  /** A metadata context (`qemu:dirty-bitmap:NAME`, `qemu:allocation-depth`) read instead of `base:allocation`. */
  "x-dirty-bitmap"?: string;
  /** Seconds requests wait for a reconnect after the connection is lost (default 0: fail at once). */
  "reconnect-delay"?: number;
  /** Seconds `open` keeps retrying to connect (default 0: one attempt). */
  "open-timeout"?: number;
}

/** Settings of {@link makeNbdDriver} that are not QEMU options. */
export interface NbdDriverConfig {
  /** Requests in flight per connection (default 16). */
  maxInFlight?: number;
  /** Milliseconds for one connection attempt plus handshake (default 30 000). */
  connectTimeoutMs?: number;
}

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
] as const;

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
  #client: NbdClient;
  readonly #clientOptions: NbdClientOptions;
  #reconnecting: Promise<NbdClient> | undefined;

  /** @internal Use {@link nbdDriver}.open. */
  constructor(client: NbdClient, options: NbdOptions, clientOptions: NbdClientOptions) {
    super({ requestAlignment: client.minimumBlockSize, maxTransfer: client.maxPayload });
    this.#client = client;
    this.options = options;
    this.#clientOptions = clientOptions;
    this.statusContext = options["x-dirty-bitmap"] ?? META_BASE_ALLOCATION;
  }

  /** The current connection (replaced after a reconnect). */
  get client(): NbdClient {
    return this.#client;
  }

  /** FUA is always honoured: natively, or by a flush after the write when the server lacks FUA. */
  protected override supportsFua(): boolean {
    return true;
  }

  /**
   * Runs `fn` on the connection; when the connection is lost and `reconnect-delay` is set, reconnects
   * (one shared attempt, for up to that many seconds) and runs `fn` once more on the new connection.
   */
  async #io<T>(fn: (c: NbdClient) => Promise<T>): Promise<T> {
    const c = this.#client;
    try {
      if (c.error !== undefined) throw c.error;
      return await fn(c);
    } catch (e) {
      const delay = this.options["reconnect-delay"] ?? 0;
      if (delay === 0 || c.error === undefined || this.closed) throw e;
      const fresh = await this.#reconnect(c, delay).catch(() => {
        throw e;
      });
      return fn(fresh);
    }
  }

  #reconnect(lost: NbdClient, delaySeconds: number): Promise<NbdClient> {
    if (this.#client !== lost) return Promise.resolve(this.#client);
    this.#reconnecting ??= (async () => {
      try {
        const c = await connectUntil(this.#clientOptions, Date.now() + delaySeconds * 1000);
        if (c.size !== lost.size) {
          await c.close();
          throw new BlkError("EIO", `NBD export size changed from ${lost.size} to ${c.size} on reconnect`);
        }
        this.#client = c;
        return c;
      } finally {
        this.#reconnecting = undefined;
      }
    })();
    return this.#reconnecting;
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
    if (!this.#client.canZero) {
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
    if (!this.#client.canTrim) return;
    await this.#io((c) => c.trim(offset, bytes));
  }

  protected override async _flush(_flags: FlushFlags): Promise<void> {
    if (!this.#client.canFlush) return;
    await this.#io((c) => c.flush());
  }

  protected override async _blockStatus(offset: number, bytes: number): Promise<BlockStatusExtent[]> {
    if (!this.#client.contexts.has(this.statusContext)) {
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
    return this.#client.size;
  }

  protected override async _info(): Promise<BlockDriverInfo> {
    return {};
  }

  protected override async _close(): Promise<void> {
    await this.#reconnecting?.catch(() => undefined);
    await this.#client.close();
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
      if (o["tls-creds"] !== undefined) {
        throw new BlkError("ENOTSUP", "NBD over TLS is not supported yet: 'tls-creds' cannot be used");
      }
      const clientOptions: NbdClientOptions = {
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
      return new NbdState(client, o, clientOptions);
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
