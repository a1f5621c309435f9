/**
 * How the block command set is registered: each command module (`src/commands/*.ts`) is a group whose
 * names are known up front and whose module is imported on the first call of one of its commands (blkd's
 * command line), or at once (`createDaemon` without `lazy`). A lazy command's placeholder passes its
 * arguments through; the real declaration then validates them, so answers and errors are the same.
 *
 * Adding a command module: append a group here, in the order `query-commands` should list its names
 * (test/startup.test.ts checks the names against the modules). A name missing here still works — an
 * unknown name loads every group before it is called unknown — but costs that load, and `query-commands`
 * lists it (last) only once its module is loaded.
 */
import {
  type CommandContext,
  type CommandDefinition,
  CommandRegistry,
  type CommandRegistryOptions,
  QmpError,
} from "@blk/qmp";
import type { DaemonState } from "./context.ts";

/** The commands of one module, as its factory builds them. */
export type CommandFactory = (
  state: DaemonState,
  registry: CommandRegistry,
) => readonly CommandDefinition<never, unknown>[];

/** One command module. */
export interface CommandGroup {
  /** A short id (the module's name). */
  readonly id: string;
  /** The command names it registers, in its order. */
  readonly names: readonly string[];
  /** Its commands use the job manager (`@blk/jobs` is loaded first). */
  readonly jobs?: boolean;
  /** Its commands look at every registered command (every other group is loaded first). */
  readonly all?: boolean;
  /**
   * The block drivers it needs: absent, all of them (loaded with the module: its commands may open
   * nodes); `none`; `per-call`, those the arguments name (the daemon's per-command hook, `blockdev-add`).
   */
  readonly drivers?: "none" | "per-call";
  load(): Promise<CommandFactory>;
}

/** blkd's command modules, in `query-commands` order (after the QMP builtins, before `quit`). */
export const COMMAND_GROUPS: readonly CommandGroup[] = [
  {
    id: "nodes",
    names: [
      "blockdev-add",
      "blockdev-del",
      "query-named-block-nodes",
      "query-block",
      "x-debug-query-block-graph",
      "block_resize",
      "query-blockstats",
    ],
    drivers: "per-call",
    load: async () => (await import("./commands/nodes.ts")).nodeCommands,
  },
  {
    id: "bitmaps",
    names: [
      "block-dirty-bitmap-add",
      "block-dirty-bitmap-remove",
      "block-dirty-bitmap-clear",
      "block-dirty-bitmap-enable",
      "block-dirty-bitmap-disable",
      "block-dirty-bitmap-merge",
      "x-debug-block-dirty-bitmap-sha256",
    ],
    drivers: "none",
    load: async () => (await import("./commands/bitmaps.ts")).bitmapCommands,
  },
  {
    id: "objects",
    names: ["object-add", "object-del", "qom-get", "qom-set", "qom-list"],
    drivers: "none",
    load: async () => (await import("./commands/objects.ts")).objectCommands,
  },
  {
    id: "jobs",
    names: [
      "query-jobs",
      "query-block-jobs",
      "job-pause",
      "job-resume",
      "job-cancel",
      "job-complete",
      "job-finalize",
      "job-dismiss",
      "block-job-set-speed",
      "block-job-cancel",
      "block-job-pause",
      "block-job-resume",
      "block-job-complete",
      "block-job-finalize",
      "block-job-dismiss",
    ],
    jobs: true,
    drivers: "none",
    load: async () => (await import("./commands/jobs.ts")).jobCommands,
  },
  {
    id: "block-jobs",
    names: [
      "blockdev-mirror",
      "blockdev-backup",
      "block-commit",
      "block-stream",
      "drive-mirror",
      "drive-backup",
    ],
    jobs: true,
    load: async () => (await import("./commands/block-jobs.ts")).blockJobCommands,
  },
  {
    id: "exports",
    names: [
      "nbd-server-start",
      "nbd-server-stop",
      "block-export-add",
      "block-export-del",
      "query-block-exports",
    ],
    drivers: "none",
    load: async () => (await import("./commands/exports.ts")).exportCommands,
  },
  {
    id: "write-threshold",
    names: ["block-set-write-threshold"],
    drivers: "none",
    load: async () => (await import("./commands/write-threshold.ts")).writeThresholdCommands,
  },
  {
    id: "snapshots",
    names: ["blockdev-snapshot-sync", "blockdev-snapshot"],
    load: async () => (await import("./commands/snapshots.ts")).snapshotCommands,
  },
  {
    id: "create",
    names: ["blockdev-create"],
    jobs: true,
    load: async () => (await import("./commands/create.ts")).createCommands,
  },
  {
    id: "transaction",
    names: ["transaction"],
    jobs: true,
    load: async () => (await import("./commands/transaction.ts")).transactionCommands,
  },
  {
    id: "control",
    names: ["query-qmp-schema"],
    all: true,
    drivers: "none",
    load: async () => {
      const { controlCommands } = await import("./commands/control.ts");
      return (_state, registry) => controlCommands(registry);
    },
  },
];

/** Options of {@link LazyCommandRegistry}. */
export interface LazyCommandRegistryOptions extends CommandRegistryOptions {
  /** The daemon the commands act on. */
  state: DaemonState;
  /** The command modules (default {@link COMMAND_GROUPS}). */
  groups?: readonly CommandGroup[];
  /** Loads what a group needs besides its module (the job manager for `jobs: true`, drivers). */
  prepare?: (group: CommandGroup) => Promise<void>;
  /** Runs before the handler of the named commands, with the validated arguments. */
  beforeCall?: Readonly<Record<string, (args: unknown) => Promise<void>>>;
}

/** Passes a lazy command's arguments to the real declaration, which validates them. */
const PASS_THROUGH = { parse: (v: unknown): unknown => v };

const notFound = (name: string): QmpError =>
  new QmpError("CommandNotFound", `The command ${name} has not been found`);

/**
 * A {@link CommandRegistry} whose command modules are imported on first use. `names()`, `has()` and
 * `query-commands` see every listed command from the start, in the order of the lists (the order the
 * modules register them); `get()` answers a placeholder until the module is loaded, then the real
 * declaration (which {@link LazyCommandRegistry.loadAll} installs for all).
 */
export class LazyCommandRegistry extends CommandRegistry {
  readonly #state: DaemonState;
  readonly #groups: readonly CommandGroup[];
  readonly #prepare: ((group: CommandGroup) => Promise<void>) | undefined;
  readonly #beforeCall: Readonly<Record<string, (args: unknown) => Promise<void>>>;
  readonly #loading = new Map<CommandGroup, Promise<void>>();
  readonly #placeholders = new WeakSet<object>();
  #allLoaded = false;

  constructor(options: LazyCommandRegistryOptions) {
    const { state, groups, prepare, beforeCall, ...base } = options;
    super(base);
    this.#state = state;
    this.#groups = groups ?? COMMAND_GROUPS;
    this.#prepare = prepare;
    this.#beforeCall = beforeCall ?? {};
    for (const group of this.#groups) {
      for (const name of group.names) this.add(this.#placeholder(group, name));
    }
  }

  /** True once every command module is loaded. */
  get allLoaded(): boolean {
    return this.#allLoaded;
  }

  #placeholder(group: CommandGroup, name: string): CommandDefinition<unknown, unknown> {
    const def: CommandDefinition<unknown, unknown> = {
      name,
      args: PASS_THROUGH,
      handler: async (args: unknown, ctx: CommandContext) => {
        await this.load(group);
        return this.#runLoaded(name, args, ctx);
      },
    };
    this.#placeholders.add(def);
    return def;
  }

  async #runLoaded(name: string, args: unknown, ctx: CommandContext): Promise<unknown> {
    let real = super.get(name);
    if (real === undefined || this.#placeholders.has(real)) {
      await this.loadAll();
      real = super.get(name);
      if (real === undefined || this.#placeholders.has(real)) throw notFound(name);
    }
    return this.run(real, args as Record<string, unknown> | undefined, ctx);
  }

  /**
   * The declaration of `name`. While some modules are not loaded, a name nobody declared yet gets a probe
   * that loads them all before answering `CommandNotFound` (so a module's command missing from its
   * group's list still works).
   */
  override get(name: string): CommandDefinition<unknown, unknown> | undefined {
    const def = super.get(name);
    if (def !== undefined || this.#allLoaded) return def;
    return {
      name,
      args: PASS_THROUGH,
      // exec-oob of an unknown name must still be CommandNotFound; no blkd command allows OOB.
      allowOob: true,
      handler: async (args: unknown, ctx: CommandContext) => {
        await this.loadAll();
        const real = super.get(name);
        if (real === undefined) throw notFound(name);
        return this.run(real, args as Record<string, unknown> | undefined, ctx);
      },
    };
  }

  override async dispatch(
    name: string,
    args: Record<string, unknown> | undefined,
    ctx: CommandContext,
  ): Promise<unknown> {
    const command = this.get(name);
    if (command === undefined) throw notFound(name);
    return this.run(command, args, ctx);
  }

  /** Imports `group`'s module (once) and installs its real declarations in place of the placeholders. */
  load(group: CommandGroup): Promise<void> {
    let p = this.#loading.get(group);
    if (p === undefined) {
      p = (async () => {
        if (group.all === true)
          await Promise.all(this.#groups.filter((g) => g !== group).map((g) => this.load(g)));
        await this.#prepare?.(group);
        const factory = await group.load();
        const defs = factory(this.#state, this);
        for (const def of defs) this.replace(this.#withBeforeCall(def));
        if (group.all === true) this.#prune();
      })();
      this.#loading.set(group, p);
      // A failed import may be retried by the next call.
      p.catch(() => this.#loading.delete(group));
    }
    return p;
  }

  /** Loads every command module; placeholders nobody declared are removed. */
  async loadAll(): Promise<void> {
    if (this.#allLoaded) return;
    await Promise.all(this.#groups.map((g) => this.load(g)));
    this.#prune();
    this.#allLoaded = true;
  }

  /** Once every module is loaded: drops the placeholders of names no module declared. */
  #prune(): void {
    for (const name of this.names()) {
      const def = super.get(name);
      if (def !== undefined && this.#placeholders.has(def)) this.remove(name);
    }
  }

  #withBeforeCall(def: CommandDefinition<never, unknown>): CommandDefinition<never, unknown> {
    const before = Object.hasOwn(this.#beforeCall, def.name) ? this.#beforeCall[def.name] : undefined;
    if (before === undefined) return def;
    return {
      ...def,
      handler: async (args: never, ctx: CommandContext) => {
        await before(args);
        return def.handler(args, ctx);
      },
    };
  }
}
