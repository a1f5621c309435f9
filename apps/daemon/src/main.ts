/**
 * blkd's entry point: qemu-storage-daemon's command line (options applied in order), then run until
 * `quit`, SIGTERM or SIGINT, and shut down cleanly. `--help`, `--version` and usage errors are answered
 * before anything else is loaded; the daemon and its command modules are imported when needed.
 */
import type { Daemon } from "./daemon.ts";
import { jsonLinesTo } from "./log.ts";
import type { OptionName } from "./options.ts";
import type { PidFile } from "./pidfile.ts";
import { BLKD_VERSION } from "./version.ts";

const PROG = "blkd";

/** `blkd --help`. */
export function helpText(): string {
  return `Usage: ${PROG} [options]
blkd: a block-layer daemon compatible with qemu-storage-daemon 7.2's command line and QMP monitor

  -h, --help             print this help and exit
  -V, --version          print the version and exit
  -T, --trace ...        accepted for compatibility, ignored

  --blockdev [driver=]<driver>[,node-name=<N>][,<option>=<value>...]
  --blockdev '<JSON BlockdevOptions>'
                         open a block node (as QMP blockdev-add); drivers: file, raw,
                         qcow2, nbd, null-co, null-aio, throttle, blkdebug

  --chardev socket,id=<id>,path=<path>,server=on[,wait=off]
  --chardev socket,id=<id>,host=<host>,port=<port>,server=on[,wait=off]
                         declare a listening socket for a monitor

  --monitor [chardev=]<id>[,mode=control][,pretty=on|off]
                         serve QMP on the socket of chardev <id>

  --object throttle-group,id=<id>[,x-bps-total=<n>...][,limits.<limit>=<n>...]
  --object help | <type>,help
                         create an object (as QMP object-add)

  --nbd-server addr.type=unix,addr.path=<path>[,max-connections=<n>]
  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>[,max-connections=<n>]
                         start the NBD server (as QMP nbd-server-start)

  --export [type=]nbd,id=<id>,node-name=<node>[,name=<export-name>][,writable=on|off]
           [,description=<text>][,bitmaps.0=<bitmap>][,allocation-depth=on|off]
                         export a node over NBD (as QMP block-export-add)

  --daemonize            daemonize the process, and have the parent exit once the
                         daemon is up (options applied, pid file written)
  --pidfile <path>       write the process id to <path> once started (locked while
                         blkd runs); removed on exit

Options are applied in the order given. Logs go to stderr as JSON lines.
`;
}

/** `blkd --version`. */
export function versionText(): string {
  return `${PROG} version ${BLKD_VERSION} (compatible with qemu-storage-daemon 7.2.0)\n`;
}

/** What `main` writes to and listens on (tests pass their own). */
export interface MainIo {
  out(text: string): void;
  err(text: string): void;
  /** Subscribes to shutdown signals; returns the unsubscribe function. */
  onSignal(fn: (signal: string) => void): () => void;
}

const processIo: MainIo = {
  out: (t) => process.stdout.write(t),
  err: (t) => process.stderr.write(t),
  onSignal: (fn) => {
    const h = (s: NodeJS.Signals): void => fn(s);
    process.on("SIGTERM", h);
    process.on("SIGINT", h);
    return () => {
      process.off("SIGTERM", h);
      process.off("SIGINT", h);
    };
  },
};

const WITH_ARG: ReadonlySet<string> = new Set([
  "blockdev",
  "chardev",
  "export",
  "monitor",
  "nbd-server",
  "object",
  "pidfile",
  "trace",
]);
const NO_ARG: ReadonlySet<string> = new Set(["help", "version", "daemonize"]);

class UsageError extends Error {}

/** One option from argv, getopt_long style (`--x ARG`, `--x=ARG`, `-h`, `-V`, `-T ARG`). */
function* getopt(argv: readonly string[]): Generator<{ name: string; arg: string | undefined }> {
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i] as string;
    if (a === "--") {
      const rest = argv[i + 1];
      if (rest !== undefined) throw new UsageError(`${rest}: Unexpected argument`);
      return;
    }
    if (a.startsWith("--")) {
      const eq = a.indexOf("=");
      const name = eq < 0 ? a.slice(2) : a.slice(2, eq);
      if (WITH_ARG.has(name)) {
        if (eq >= 0) yield { name, arg: a.slice(eq + 1) };
        else {
          const v = argv[++i];
          if (v === undefined) throw new UsageError(`option '--${name}' requires an argument`);
          yield { name, arg: v };
        }
      } else if (NO_ARG.has(name)) {
        if (eq >= 0) throw new UsageError(`option '--${name}' doesn't allow an argument`);
        yield { name, arg: undefined };
      } else throw new UsageError(`unrecognized option '${a.slice(0, eq < 0 ? undefined : eq)}'`);
    } else if (a.startsWith("-") && a.length > 1) {
      for (let j = 1; j < a.length; j++) {
        const c = a[j];
        if (c === "h") yield { name: "help", arg: undefined };
        else if (c === "V") yield { name: "version", arg: undefined };
        else if (c === "T") {
          const inline = a.slice(j + 1);
          const v = inline !== "" ? inline : argv[++i];
          if (v === undefined) throw new UsageError("option requires an argument -- 'T'");
          yield { name: "trace", arg: v };
          break;
        } else throw new UsageError(`invalid option -- '${c}'`);
      }
    } else throw new UsageError(`${a}: Unexpected argument`);
  }
}

/**
 * Runs blkd with `argv` (without node and script): applies the options in order, then serves until
 * `quit`, SIGTERM or SIGINT. Returns the exit code (0 after a clean shutdown, 1 on a bad option). With
 * `--daemonize`, returns 0 once a detached copy of blkd is up, or 1 with its error message.
 */
export async function main(argv: readonly string[], io: MainIo = processIo): Promise<number> {
  const fail = (msg: string): number => {
    io.err(`${PROG}: ${msg}\n`);
    return 1;
  };
  // qemu-storage-daemon's first pass: usage errors, --help and --version before anything is applied.
  const options: { name: string; arg: string | undefined }[] = [];
  let daemonizeWanted = false;
  let pidfilePath: string | undefined;
  try {
    for (const o of getopt(argv)) {
      if (o.name === "help") {
        io.out(helpText());
        return 0;
      }
      if (o.name === "version") {
        io.out(versionText());
        return 0;
      }
      if (o.name === "daemonize") daemonizeWanted = true;
      else if (o.name === "pidfile") pidfilePath = o.arg;
      else if (o.name !== "trace") options.push(o);
    }
  } catch (e) {
    if (e instanceof UsageError) return fail(e.message);
    throw e;
  }
  let readyFd: number | undefined;
  if (daemonizeWanted) {
    const { daemonize, daemonPipeFd } = await import("./daemonize.ts");
    readyFd = daemonPipeFd();
    if (readyFd === undefined) return daemonize(argv, io);
    // The daemonized child: files it creates get qemu-storage-daemon's umask.
    process.umask(0o027);
  }
  let daemon: Daemon | undefined;
  let pidfile: PidFile | undefined;
  let offSignals: (() => void) | undefined;
  // After a daemonized child reported it is up, nobody reads its stderr: logs go nowhere (as QEMU's).
  let quiet = false;
  const log = jsonLinesTo({
    write: (s: string) => {
      if (!quiet) io.err(s);
    },
  });
  try {
    const { createDaemon } = await import("./daemon.ts");
    const { OptionHelp } = await import("./options.ts");
    const { asQmpError } = await import("./errors.ts");
    // Created at the first option that needs it.
    const start = async (): Promise<Daemon> => {
      if (daemon !== undefined) return daemon;
      const d = await createDaemon({ log, lazy: true });
      daemon = d;
      offSignals = io.onSignal((signal) => d.requestShutdown(signal));
      return d;
    };
    for (const { name, arg } of options) {
      const d = await start();
      try {
        await d.apply(name as OptionName, arg as string);
      } catch (e) {
        if (e instanceof OptionHelp) {
          io.out(e.text);
          return 0;
        }
        return fail(`--${name} ${arg ?? ""}: ${asQmpError(e).desc}`);
      }
    }
    const d = await start();
    if (pidfilePath !== undefined) {
      const { PidFile, PidFileError } = await import("./pidfile.ts");
      try {
        pidfile = PidFile.create(pidfilePath, (msg) => d.log.warn(msg));
      } catch (e) {
        if (e instanceof PidFileError)
          return fail(e.prefixed ? `cannot create PID file: ${e.message}` : e.message);
        throw e;
      }
    }
    d.log.info("started", { pid: process.pid, version: BLKD_VERSION });
    if (readyFd !== undefined) {
      const { reportReady } = await import("./daemonize.ts");
      reportReady(readyFd);
      quiet = true;
    }
    await d.shutdownRequested;
    return 0;
  } catch (e) {
    const { asQmpError } = await import("./errors.ts");
    return fail(asQmpError(e).desc);
  } finally {
    offSignals?.();
    await daemon?.close();
    pidfile?.remove();
  }
}
