/** What every command gets: where to write, whether stdout is a terminal, the program name. */

/** Where blk-img writes; defaults to the process's streams. */
export interface CliIo {
  stdout: { write(chunk: string): unknown };
  stderr: { write(chunk: string): unknown };
  /** stdout is a terminal (`-p` then draws a progress bar). Default: `process.stdout.isTTY`. */
  isTTY?: boolean;
  /** Terminal width for the progress bar (default 80). */
  columns?: number;
}

/** The program name used in messages. */
export const PROG = "blk-img";

/** A command's view of the I/O. */
export interface Context {
  readonly io: CliIo;
  /** Writes to stdout. */
  out(text: string): void;
  /** Writes one line `blk-img: <line>` to stderr. */
  error(line: string): void;
  /** Writes raw text to stderr. */
  err(text: string): void;
}

/** Builds a {@link Context} over `io`. */
export function makeContext(io: CliIo): Context {
  return {
    io,
    out: (text) => void io.stdout.write(text),
    error: (line) => void io.stderr.write(`${PROG}: ${line}\n`),
    err: (text) => void io.stderr.write(text),
  };
}

/** A command: parses its own arguments and returns the exit code. */
export type Command = (args: readonly string[], ctx: Context) => Promise<number>;
