/**
 * blk-img's entry point: qemu-img's global options, command dispatch, and the top-level handler that
 * turns every failure into `blk-img: <message>` and an exit code (never a stack trace).
 */
import { type CliIo, type Command, type Context, makeContext, PROG } from "./context.ts";
import { CliError, messageOf, usage } from "./errors.ts";
import { helpText, versionText } from "./usage.ts";

export type { CliIo } from "./context.ts";

/**
 * A command whose module is imported when it runs: a start loads the one command it runs (and what that
 * imports), not all thirteen.
 */
function lazy<K extends string>(name: K, load: () => Promise<Record<K, Command>>): Command {
  return async (args, ctx) => (await load())[name](args, ctx);
}

/** The commands blk-img has, by name (each module is imported on the command's first run). */
export const COMMANDS: Readonly<Record<string, Command>> = {
  amend: lazy("amend", () => import("./commands/amend.ts")),
  bitmap: lazy("bitmap", () => import("./commands/bitmap.ts")),
  check: lazy("check", () => import("./commands/check.ts")),
  commit: lazy("commit", () => import("./commands/commit.ts")),
  compare: lazy("compare", () => import("./commands/compare.ts")),
  convert: lazy("convert", () => import("./commands/convert.ts")),
  create: lazy("create", () => import("./commands/create.ts")),
  info: lazy("info", () => import("./commands/info.ts")),
  map: lazy("map", () => import("./commands/map.ts")),
  measure: lazy("measure", () => import("./commands/measure.ts")),
  rebase: lazy("rebase", () => import("./commands/rebase.ts")),
  resize: lazy("resize", () => import("./commands/resize.ts")),
  snapshot: lazy("snapshot", () => import("./commands/snapshot.ts")),
};

function report(ctx: Context, e: unknown): number {
  if (e instanceof CliError) {
    for (const line of e.message.split("\n")) ctx.error(line);
    const bare = e.bare.map((line) => `${line}\n`).join("");
    ctx.err(e.bareNoNewline ? bare.slice(0, -1) : bare);
    if (e.tryHelp) ctx.err(`Try '${PROG} --help' for more information\n`);
    return e.exitCode;
  }
  ctx.error(messageOf(e));
  return 1;
}

async function dispatch(argv: readonly string[], ctx: Context): Promise<number> {
  let i = 0;
  // Global options stop at the command name (getopt "+hVT:").
  while (i < argv.length) {
    const a = argv[i] ?? "";
    if (a === "-h" || a === "--help") {
      ctx.out(helpText());
      return 0;
    }
    if (a === "-V" || a === "--version") {
      ctx.out(versionText());
      return 0;
    }
    if (a === "-T" || a === "--trace") {
      if (argv[i + 1] === undefined) throw usage(`missing argument for option '${a}'`);
      i += 2;
      continue;
    }
    if (a.startsWith("-T") || a.startsWith("--trace=")) {
      i++;
      continue;
    }
    if (a === "--") {
      i++;
      break;
    }
    if (a.startsWith("-") && a !== "-") throw usage(`unrecognized option '${a}'`);
    break;
  }
  const name = argv[i];
  if (name === undefined) throw usage("Not enough arguments");
  const cmd = Object.hasOwn(COMMANDS, name) ? COMMANDS[name] : undefined;
  if (cmd === undefined) throw usage(`Command not found: ${name}`);
  return await cmd(argv.slice(i + 1), ctx);
}

let pipesGuarded = false;

/**
 * For the process's own streams: a closed pipe (`blk-img map … | head`) ends the process quietly with
 * the shell's SIGPIPE status, as qemu-img's death by SIGPIPE does, instead of an unhandled 'error' event.
 */
function guardPipes(): void {
  if (pipesGuarded) return;
  pipesGuarded = true;
  const onError = (e: NodeJS.ErrnoException): void => {
    process.exit(e.code === "EPIPE" ? 141 : 1);
  };
  process.stdout.on("error", onError);
  process.stderr.on("error", onError);
}

/**
 * The process's streams, made when first written: a command that prints nothing (a quiet convert) does
 * not load Node's stream machinery (a few ms of start-up).
 */
function processIo(): CliIo {
  return {
    stdout: {
      write: (chunk: string) => {
        guardPipes();
        return process.stdout.write(chunk);
      },
    },
    stderr: {
      write: (chunk: string) => {
        guardPipes();
        return process.stderr.write(chunk);
      },
    },
    get isTTY(): boolean {
      return process.stdout.isTTY === true;
    },
    get columns(): number {
      // Node types `columns` as a number; it is undefined when stdout is not a terminal.
      const { columns } = process.stdout as { columns?: number };
      return columns ?? 80;
    },
  };
}

/**
 * Runs blk-img with `argv` (without the node and script paths) and returns the exit code; output goes
 * to `io` (default: the process's stdout and stderr).
 * @example
 * const code = await main(["create", "-f", "raw", "disk.raw", "64M"]);
 */
export async function main(argv: readonly string[], io?: CliIo): Promise<number> {
  const ctx = makeContext(io ?? processIo());
  try {
    return await dispatch(argv, ctx);
  } catch (e) {
    return report(ctx, e);
  }
}
