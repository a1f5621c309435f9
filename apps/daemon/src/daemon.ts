/**
 * The daemon: one block graph, job manager, throttle groups, NBD server and QMP server, with the block
 * command set registered once. Command-line options (`--blockdev`, `--object`, …) are applied through the
 * same handlers a QMP client reaches.
 */
import { BlockGraph } from "@blk/core";
import type { JobManager } from "@blk/jobs";
import { type CommandContext, defineCommand, QmpError, QmpServer, type QmpServerOptions } from "@blk/qmp";
import type { ThrottleGroup } from "@blk/throttle";
import { type CommandGroup, LazyCommandRegistry } from "./command-groups.ts";
import type { DaemonObject, DaemonState, ExportEntry } from "./context.ts";
import { DaemonDrivers } from "./driver-table.ts";
import { asQmpError } from "./errors.ts";
import { createLogger, type Logger, type LogLevel, type LogSink } from "./log.ts";
import { applyOption, OptionHelp, type OptionName } from "./options.ts";
import { QMP_VERSION } from "./version.ts";

/** Options of {@link createDaemon}. */
export interface DaemonOptions {
  /** Structured log records (default: none). `main` writes them to stderr as JSON lines. */
  log?: LogSink;
  /** Lowest level logged (default `info`). */
  logLevel?: LogLevel;
  /** Extra QmpServer options (limits, clock, …). */
  qmp?: Omit<QmpServerOptions, "registry" | "onQuit">;
  /** Command-line style options applied in order, e.g. `[["blockdev", "null-co,node-name=n"]]`. */
  options?: readonly (readonly [OptionName, string])[];
  /**
   * Import each command module and the job manager on first use (default false: everything is loaded
   * before `createDaemon` returns). blkd's command line sets it to start faster. Until a job command
   * ran, {@link Daemon.jobs} throws; `await daemon.loadAll()` loads everything.
   */
  lazy?: boolean;
}

/** A running blkd: use its {@link Daemon.qmp} server, or {@link Daemon.execute} commands directly. */
export class Daemon implements DaemonState, AsyncDisposable {
  readonly graph: BlockGraph = new BlockGraph();
  readonly objects: Map<string, DaemonObject> = new Map();
  readonly throttleGroups: Map<string, ThrottleGroup> = new Map();
  readonly exports: Map<string, ExportEntry> = new Map();
  readonly drivers: DaemonDrivers;
  readonly registry: LazyCommandRegistry;
  readonly qmp: QmpServer;
  readonly log: Logger;
  /** Chardevs declared with `--chardev` (`id` → listen address). */
  readonly chardevs: Map<string, { path: string } | { host: string; port: number }> = new Map();
  nbd: DaemonState["nbd"];
  /** Resolves when shutdown was requested (`quit`, a signal via {@link Daemon.requestShutdown}). */
  readonly shutdownRequested: Promise<string>;
  #resolveShutdown!: (reason: string) => void;
  #closing: Promise<void> | undefined;
  #jobs: JobManager | undefined;
  #jobsLoading: Promise<JobManager> | undefined;
  #offJobs: (() => void) | undefined;

  /** @internal Use {@link createDaemon}. */
  constructor(options: DaemonOptions = {}) {
    this.log = createLogger(options.log, options.logLevel);
    this.shutdownRequested = new Promise((resolve) => {
      this.#resolveShutdown = resolve;
    });
    this.drivers = new DaemonDrivers(this.throttleGroups, this);
    this.registry = new LazyCommandRegistry({
      version: QMP_VERSION,
      state: this,
      prepare: async (group: CommandGroup) => {
        if (group.jobs === true) await this.loadJobs();
        if (group.drivers === undefined) await this.drivers.loadAll();
      },
      beforeCall: { "blockdev-add": (args) => this.drivers.loadFor(args) },
    });
    this.registry.add(
      defineCommand({
        name: "quit",
        handler: async (_args: unknown, ctx: CommandContext) => {
          // As qemu-storage-daemon: exports go away (BLOCK_EXPORT_DELETED) before quit's return.
          await this.#deleteExports();
          ctx.afterResponse(() => this.requestShutdown("quit"));
          return {};
        },
      }),
    );
    this.qmp = new QmpServer({
      ...options.qmp,
      registry: this.registry,
      onError: (e) => this.log.warn("qmp error", { error: String(e) }),
    });
  }

  /**
   * The job manager.
   * @throws {Error} in a lazy daemon before `@blk/jobs` was loaded (by a job command, {@link Daemon.loadJobs}
   *   or {@link Daemon.loadAll})
   */
  get jobs(): JobManager {
    if (this.#jobs === undefined)
      throw new Error("blkd: the job manager is not loaded yet (lazy daemon): await daemon.loadJobs() first");
    return this.#jobs;
  }

  /** Loads `@blk/jobs` and creates the job manager (once); its events become QMP events. */
  loadJobs(): Promise<JobManager> {
    if (this.#jobsLoading === undefined) {
      const loading = (async () => {
        const { JobManager } = await import("@blk/jobs");
        const jobs = new JobManager();
        this.#offJobs = jobs.onEvent((e) => this.emit(e.event, e.data as unknown as Record<string, unknown>));
        this.#jobs = jobs;
        return jobs;
      })();
      // A failed import may be retried by the next call.
      loading.catch(() => {
        if (this.#jobsLoading === loading) this.#jobsLoading = undefined;
      });
      this.#jobsLoading = loading;
    }
    return this.#jobsLoading;
  }

  /** Loads every command module, driver and the job manager (what a non-lazy daemon does at creation). */
  async loadAll(): Promise<void> {
    await this.loadJobs();
    await this.drivers.loadAll();
    await this.registry.loadAll();
  }

  /** Broadcasts a QMP event to every negotiated session. */
  emit(event: string, data?: Record<string, unknown>): void {
    this.qmp.emit(event, data);
  }

  /** Asks `main` (or whoever awaits {@link Daemon.shutdownRequested}) to shut down. */
  requestShutdown(reason: string): void {
    this.log.info("shutdown requested", { reason });
    this.#resolveShutdown(reason);
  }

  /**
   * Runs a QMP command as a monitor would (validation included), without a session.
   * @throws {QmpError} with QEMU's class and text
   */
  async execute(command: string, args?: Record<string, unknown>): Promise<unknown> {
    const after: (() => void | Promise<void>)[] = [];
    const ctx: CommandContext = {
      session: undefined,
      emit: (event, data) => this.emit(event, data),
      signal: new AbortController().signal,
      afterResponse: (fn) => {
        after.push(fn);
      },
    };
    const result = await this.registry.dispatch(command, args, ctx);
    for (const fn of after) await fn();
    return result;
  }

  /**
   * Applies one qemu-storage-daemon option (`blockdev`, `object`, `nbd-server`, `export`, `chardev`,
   * `monitor`) with its argument, through the same handlers QMP uses.
   * @throws {QmpError} with QEMU's message (the caller adds the `--option ARG: ` prefix)
   */
  async apply(option: OptionName, arg: string): Promise<void> {
    try {
      await applyOption(this, option, arg);
    } catch (e) {
      if (e instanceof OptionHelp) throw e;
      throw asQmpError(e);
    }
  }

  async #deleteExports(): Promise<void> {
    if (this.exports.size === 0) return;
    const { exportDel } = await import("./commands/exports.ts");
    for (const entry of [...this.exports.values()]) {
      try {
        await exportDel(this, entry, "hard");
      } catch (e) {
        this.log.warn("export removal failed", { id: entry.id, error: String(e) });
      }
    }
  }

  /**
   * Shuts down cleanly: exports removed (`BLOCK_EXPORT_DELETED`), NBD server stopped, jobs cancelled,
   * nodes flushed and closed (parents first), monitors closed. Idempotent.
   */
  close(): Promise<void> {
    this.#closing ??= (async () => {
      this.log.info("shutting down");
      await this.#deleteExports();
      if (this.nbd !== undefined) {
        const { nbdServerStop } = await import("./commands/exports.ts");
        await nbdServerStop(this).catch(() => {});
      }
      // A job manager still loading has no jobs yet, but must not start any after this point.
      const jobs = this.#jobs ?? (await this.#jobsLoading?.catch(() => undefined));
      await jobs?.cancelAll().catch((e: unknown) => this.log.warn("job cancel failed", { error: String(e) }));
      this.#offJobs?.();
      await this.#closeNodes();
      await this.qmp.close();
      this.log.info("shut down");
    })();
    return this.#closing;
  }

  async #closeNodes(): Promise<void> {
    for (let round = 0; round < 1000 && this.graph.nodes.size > 0; round++) {
      const roots = this.graph.list().filter((n) => n.parents.length === 0);
      const victims = roots.length > 0 ? roots : this.graph.list();
      for (const node of victims) {
        if (this.graph.find(node.nodeName) !== node) continue;
        try {
          await node.flush();
        } catch (e) {
          this.log.warn("flush failed", { "node-name": node.nodeName, error: String(e) });
        }
        try {
          await this.graph.delete(node, { force: true });
        } catch (e) {
          this.log.warn("close failed", { "node-name": node.nodeName, error: String(e) });
        }
      }
    }
  }

  /** Same as {@link Daemon.close}. */
  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }
}

/**
 * Creates a daemon and applies `options.options` in order (on failure the daemon is closed and the error
 * rethrown, prefixed as qemu-storage-daemon prints it).
 * @example
 * await using daemon = await createDaemon({ options: [["blockdev", "null-co,node-name=n"]] });
 * await daemon.qmp.listen({ path: "/tmp/qmp.sock" });
 * @throws {QmpError} `--OPTION ARG: MESSAGE`
 */
export async function createDaemon(options: DaemonOptions = {}): Promise<Daemon> {
  const daemon = new Daemon(options);
  if (options.lazy !== true) await daemon.loadAll();
  for (const [name, arg] of options.options ?? []) {
    try {
      await daemon.apply(name, arg);
    } catch (e) {
      await daemon.close();
      if (e instanceof OptionHelp) throw e;
      const err = asQmpError(e);
      throw new QmpError(err.errorClass, `--${name} ${arg}: ${err.desc}`, { cause: e });
    }
  }
  return daemon;
}
