/** `--help` and `--version` texts. */
import { createRequire } from "node:module";
import { PROG } from "./context.ts";

/** The QEMU version whose qemu-img behaviour blk-img follows. */
const QEMU_COMPAT = "7.2.0";

/** This package's version (from its package.json, one level above both `src/` and `dist/`). */
function packageVersion(): string {
  const pkg = createRequire(import.meta.url)("../package.json") as { version?: unknown };
  return typeof pkg.version === "string" ? pkg.version : "0.0.0";
}

/** The `--version` text. */
export function versionText(): string {
  return `${PROG} version ${packageVersion()} (compatible with qemu-img ${QEMU_COMPAT})\n`;
}

/** Synopsis of each command, in qemu-img's option syntax. */
const SYNOPSIS: Readonly<Record<string, string>> = {
  bitmap:
    "bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)... [-b source_file [-F source_fmt]] [-g granularity] [--object objectdef] [--image-opts | -f fmt] filename bitmap",
  amend:
    "amend [--object objectdef] [--image-opts] [-p] [-q] [-f fmt] [-t cache] [--force] -o options filename",
  check:
    "check [--object objectdef] [--image-opts] [-q] [-f fmt] [--output=ofmt] [-r [leaks | all]] [-T src_cache] [-U] filename",
  commit:
    "commit [--object objectdef] [--image-opts] [-q] [-f fmt] [-t cache] [-b base] [-r rate_limit] [-d] [-p] filename",
  compare:
    "compare [--object objectdef] [--image-opts] [-f fmt] [-F fmt] [-T src_cache] [-p] [-q] [-s] [-U] filename1 filename2",
  convert:
    "convert [--object objectdef] [--image-opts] [--target-image-opts] [--target-is-zero] [-U] [-c] [-p] [-q] [-n] [-f fmt] [-t cache] [-T src_cache] [-O output_fmt] [-o options] [-S sparse_size] [-r rate_limit] [-m num_coroutines] [-W] filename [filename2 [...]] output_filename",
  create:
    "create [--object objectdef] [-q] [-f fmt] [-b backing_file [-F backing_fmt]] [-u] [-o options] filename [size]",
  info: "info [--object objectdef] [--image-opts] [-f fmt] [--output=ofmt] [--backing-chain] [-U] filename",
  map: "map [--object objectdef] [--image-opts] [-f fmt] [--start-offset=offset] [--max-length=len] [--output=ofmt] [-U] filename",
  measure:
    "measure [--output=ofmt] [-O output_fmt] [-o options] [--size N | [--object objectdef] [--image-opts] [-f fmt] [-l snapshot_param] filename]",
  rebase:
    "rebase [--object objectdef] [--image-opts] [-U] [-q] [-f fmt] [-t cache] [-T src_cache] [-p] [-u] -b backing_file [-F backing_fmt] filename",
  resize:
    "resize [--object objectdef] [--image-opts] [-f fmt] [--preallocation=prealloc] [-q] [--shrink] filename [+ | -]size",
  snapshot:
    "snapshot [--object objectdef] [--image-opts] [-U] [-q] [-l | -a snapshot | -c snapshot | -d snapshot] filename",
};

/** The `--help` text. */
export function helpText(): string {
  const cmds = Object.values(SYNOPSIS)
    .map((s) => `  ${s}`)
    .join("\n");
  return `usage: ${PROG} [-h | -V] command [command options]
blk-img: disk image tool of the blk block layer, with qemu-img's command syntax, exit codes and output.

  -h, --help       print this help and exit
  -V, --version    print the version and exit

Commands:
${cmds}

Arguments:
  filename     an image file (or with --image-opts a key=value,... option string)
  fmt          an image format (raw, and every format the driver registry knows); probed when omitted
  size         bytes, or a number with a suffix k, M, G, T, P or E (powers of 1024)
  cache        none, writeback, writethrough, directsync or unsafe (accepted; blk uses the page cache)
  ofmt         human (default) or json
  -p           show progress (a bar on a terminal, qemu-img's "(P/100%)" lines otherwise)
  -q           quiet: print only errors
  -U           open the image without taking locks (read-only)

Exit codes are qemu-img's: 0 on success and 1 on error, except
  check    0 consistent, 1 not checked, 2 corrupt, 3 leaks only, 63 format without checks
  compare  0 identical, 1 different, 2 open error, 3 allocation-check error, 4 read error
`;
}

/** `-h` of one command. */
export function commandHelp(command: string): string {
  const s = SYNOPSIS[command];
  return s === undefined ? helpText() : `usage: ${PROG} ${s}\n`;
}
