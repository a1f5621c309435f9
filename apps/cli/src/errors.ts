/** Errors a command raises to end with a message and an exit code (never a stack trace). */

/**
 * An error that `main` prints as `blk-img: <line>` for each line of `message` (then the `bare` lines
 * as they are), then exits with `exitCode`.
 */
export class CliError extends Error {
  override readonly name = "CliError";
  /** Process exit code (default 1). */
  readonly exitCode: number;
  /** Print `Try 'blk-img --help' for more information` after the message (usage errors). */
  readonly tryHelp: boolean;
  /** Lines printed after the first one without the program prefix (qemu-img's continuation lines). */
  readonly bare: readonly string[];

  /** End the last `bare` line without a newline (qemu-img's `Detected format of X.` quirk). */
  readonly bareNoNewline: boolean;

  constructor(
    message: string,
    options: { exitCode?: number; tryHelp?: boolean; bare?: readonly string[]; bareNoNewline?: boolean } = {},
  ) {
    super(message);
    this.exitCode = options.exitCode ?? 1;
    this.tryHelp = options.tryHelp ?? false;
    this.bare = options.bare ?? [];
    this.bareNoNewline = options.bareNoNewline ?? false;
  }
}

/** A usage error: message plus the `Try … --help` line, exit 1. */
export function usage(message: string): CliError {
  return new CliError(message, { tryHelp: true });
}

/** The message of anything thrown. */
export function messageOf(e: unknown): string {
  if (e instanceof Error) return e.message;
  return String(e);
}

/** qemu-img's two-line message for a size it cannot parse (`what`: `image size`, `start offset`, …). */
export function invalidSize(what = "image size"): CliError {
  return new CliError(
    `Invalid ${what} specified. You may use k, M, G, T, P or E suffixes for\n` +
      "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.",
  );
}

/** The lines QEMU prints after `Parameter 'X' expects a non-negative number below 2^64` (no prefix). */
export const SIZE_SUFFIX_HINT: readonly string[] = [
  "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-",
  "and exabytes, respectively.",
];

/** qemu-img's message for a size-typed option value it cannot parse (`Parameter 'size' expects …`). */
export function invalidSizeParameter(key: string, prefix = ""): CliError {
  return new CliError(`${prefix}Parameter '${key}' expects a non-negative number below 2^64`, {
    bare: SIZE_SUFFIX_HINT,
  });
}

/** qemu-img's message for a size option out of range (`cvtnum`): `Invalid WHAT specified. Must be between …`. */
export function sizeOutOfRange(what: string): CliError {
  return new CliError(`Invalid ${what} specified. Must be between 0 and 9223372036854775807.`);
}
