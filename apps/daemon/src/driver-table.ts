/**
 * The block drivers blkd opens nodes with (`file`, `raw`, `qcow2`, `nbd`, `null-co`, `null-aio`,
 * `throttle`, `blkdebug`), each imported from its `@blk/drivers` subpath the first time a node of that driver is
 * opened — never the package's barrel, which would load every driver (NBD client, gluster) up front.
 * Lookups stay synchronous, as core's `openBlockdev` wants them: callers load what a blockdev tree names
 * ({@link DaemonDrivers.loadFor}) or everything ({@link DaemonDrivers.loadAll}) before opening nodes.
 */
import { BlkError, type BlockDriver } from "@blk/core";
import type { ThrottleGroup } from "@blk/throttle";
import type { DaemonState } from "./context.ts";

// biome-ignore lint/suspicious/noExplicitAny: a table holds drivers of any option type
type AnyDriver = BlockDriver<any>;

/** What a driver loader gets: the daemon's throttle groups and its state (for `tls-creds-*` objects). */
interface LoaderContext {
  groups: Map<string, ThrottleGroup>;
  state: DaemonState | undefined;
}

/** How to load each driver blkd offers, in the order they are registered when all load. */
const LOADERS: readonly (readonly [string, (ctx: LoaderContext) => Promise<AnyDriver>])[] = [
  ["file", async () => (await import("@blk/drivers/file")).fileDriver],
  ["raw", async () => (await import("@blk/drivers/raw")).rawDriver],
  ["null-co", async () => (await import("@blk/drivers/null")).nullDriver],
  ["null-aio", async () => (await import("@blk/drivers/null")).nullAioDriver],
  ["blkdebug", async () => (await import("@blk/drivers/blkdebug")).blkdebugDriver],
  ["throttle", async ({ groups }) => (await import("@blk/drivers/throttle")).makeThrottleDriver(groups)],
  [
    "nbd",
    async ({ state }) => {
      const { makeNbdDriver } = await import("@blk/drivers/nbd");
      if (state === undefined) return makeNbdDriver();
      // `tls-creds` names the daemon's tls-creds-psk / tls-creds-x509 objects.
      const { tlsCredsLookup } = await import("./commands/objects.ts");
      return makeNbdDriver({ tlsCreds: tlsCredsLookup(state) });
    },
  ],
  [
    "qcow2",
    async ({ state }) => {
      const { qcow2Driver, Qcow2State } = await import("@blk/drivers/qcow2");
      return {
        ...qcow2Driver,
        open: async (o, ctx) => {
          // The daemon opens the header's backing file itself when `backing` is absent (withHeaderBacking),
          // so a qcow2 node opened without a backing child was asked for `backing: null`.
          const s = await qcow2Driver.open(ctx.children.has("backing") ? o : { ...o, backing: null }, ctx);
          // Metadata found corrupt at run time: QEMU's event (qsd has no named devices: `device` is "").
          // The driver does not report the offset and size of the bad metadata: they are left out.
          if (state !== undefined && s instanceof Qcow2State)
            s.onCorruption = (e) =>
              state.emit("BLOCK_IMAGE_CORRUPTED", {
                device: "",
                "node-name": ctx.nodeName,
                msg: e.message,
                fatal: e.fatal,
              });
          return s;
        },
      } satisfies typeof qcow2Driver;
    },
  ],
];

/**
 * A driver table (format name → driver) with `@blk/drivers`' `DriverRegistry` lookups (`get`, `require`,
 * `register`, `unregister`, `formats`), whose built-in drivers load on demand.
 */
export class DaemonDrivers {
  readonly #drivers = new Map<string, AnyDriver>();
  readonly #loading = new Map<string, Promise<void>>();
  readonly #ctx: LoaderContext;

  /**
   * @param throttleGroups the daemon's throttle groups (`throttle` nodes look theirs up here)
   * @param state the daemon whose `tls-creds-*` objects `nbd` nodes' `tls-creds` name
   */
  constructor(throttleGroups: Map<string, ThrottleGroup>, state?: DaemonState) {
    this.#ctx = { groups: throttleGroups, state };
  }

  /** The driver of `format` if it is loaded (or was registered), else undefined. */
  get(format: string): AnyDriver | undefined {
    return this.#drivers.get(format);
  }

  /**
   * The driver of `format`.
   * @throws {BlkError} EINVAL `Unknown driver 'X'` when it is not loaded
   */
  require(format: string): AnyDriver {
    const d = this.#drivers.get(format);
    if (d === undefined) throw new BlkError("EINVAL", `Unknown driver '${format}'`);
    return d;
  }

  /**
   * Adds a driver (tests add an NBD client driver).
   * @throws {BlkError} EEXIST when the name is taken and `replace` is not set
   */
  register(driver: AnyDriver, options: { replace?: boolean } = {}): void {
    if (this.#drivers.has(driver.format) && options.replace !== true)
      throw new BlkError("EEXIST", `Driver '${driver.format}' is already registered`);
    this.#drivers.set(driver.format, driver);
  }

  /** Removes a driver; true when it was there. */
  unregister(format: string): boolean {
    return this.#drivers.delete(format);
  }

  /** The formats loaded or registered so far. */
  formats(): string[] {
    return [...this.#drivers.keys()];
  }

  /** Loads the built-in drivers of `formats` (unknown names are ignored: lookups then fail as usual). */
  async load(formats: Iterable<string>): Promise<void> {
    const wanted = new Set(formats);
    await Promise.all(LOADERS.filter(([f]) => wanted.has(f)).map(([f, loader]) => this.#load(f, loader)));
  }

  /** Loads every built-in driver. */
  loadAll(): Promise<void> {
    return this.load(LOADERS.map(([f]) => f));
  }

  /**
   * Loads the drivers a blockdev options tree names. A tree with a `qcow2` node (whose backing file may be
   * of any format) or with a driver blkd does not know loads them all.
   */
  loadFor(options: unknown): Promise<void> {
    const names = new Set<string>();
    const walk = (v: unknown, depth: number): void => {
      if (typeof v !== "object" || v === null || depth > 64) return;
      if (Array.isArray(v)) {
        for (const x of v) walk(x, depth + 1);
        return;
      }
      for (const [k, x] of Object.entries(v)) {
        if (k === "driver" && typeof x === "string") names.add(x);
        else walk(x, depth + 1);
      }
    };
    walk(options, 0);
    const known = new Set(LOADERS.map(([f]) => f));
    if (names.has("qcow2") || [...names].some((n) => !known.has(n))) return this.loadAll();
    return this.load(names);
  }

  #load(format: string, loader: (ctx: LoaderContext) => Promise<AnyDriver>): Promise<void> {
    if (this.#drivers.has(format)) return Promise.resolve();
    let p = this.#loading.get(format);
    if (p === undefined) {
      p = loader(this.#ctx).then((d) => {
        if (!this.#drivers.has(format)) this.#drivers.set(format, d);
      });
      this.#loading.set(format, p);
      p.catch(() => this.#loading.delete(format));
    }
    return p;
  }
}
