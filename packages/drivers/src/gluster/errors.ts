import { BlkError } from "@blk/core";

/**
 * The hint QEMU 7.2 appends to every `invalid URI <filename>` error (printed on its own line by qemu-img).
 */
export const GLUSTER_URI_USAGE: string =
  "Usage: file=gluster[+transport]://[host[:port]]volume/path[?socket=...][,file.debug=N][,file.logfile=/path/filename.log]";

/**
 * The hint QEMU 7.2 appends to every error of the JSON / `server[]` form. It is QEMU's text verbatim, including
 * its typo `file.server.1.transport=unix` (the real key is `type`).
 */
export const GLUSTER_JSON_USAGE: string =
  "Usage: -drive driver=qcow2,file.driver=gluster,file.volume=testvol,file.path=/path/a.qcow2[,file.debug=9][,file.logfile=/path/filename.log],file.server.0.type=inet,file.server.0.host=1.2.3.4,file.server.0.port=24007,file.server.1.transport=unix,file.server.1.path=/var/run/glusterd.socket ...";

/** Options for {@link GlusterError}. */
export interface GlusterErrorOptions {
  /** The `server` array index QEMU names in its `hint: check in 'server' array index 'N'` line. */
  serverIndex?: number;
  /** The Usage line QEMU appends ({@link GLUSTER_URI_USAGE} or {@link GLUSTER_JSON_USAGE}). */
  usage?: string;
  cause?: unknown;
}

/**
 * A gluster option or URL rejection: a {@link BlkError} with code `EINVAL` whose `message` is QEMU 7.2's exact
 * error text, and QEMU's hint lines kept apart from it.
 *
 * @example
 * try { parseGlusterUri("gluster://h/testvol"); } catch (e) {
 *   if (e instanceof GlusterError) console.log(e.message, e.hint);
 * }
 */
export class GlusterError extends BlkError {
  /**
   * QEMU's hint lines in the order qemu-img prints them (index hint first, then the Usage line), joined with
   * `"\n"`, without the final newline; `undefined` when QEMU prints no hint.
   */
  readonly hint: string | undefined;
  /** The index of the offending `server` entry when QEMU names one, else `undefined`. */
  readonly serverIndex: number | undefined;
  /** QEMU's Usage line when it prints one, else `undefined`. */
  readonly usage: string | undefined;

  constructor(message: string, options: GlusterErrorOptions = {}) {
    super("EINVAL", message, options.cause === undefined ? undefined : { cause: options.cause });
    this.serverIndex = options.serverIndex;
    this.usage = options.usage;
    const lines: string[] = [];
    if (options.serverIndex !== undefined)
      lines.push(`hint: check in 'server' array index '${options.serverIndex}'`);
    if (options.usage !== undefined) lines.push(options.usage);
    this.hint = lines.length > 0 ? lines.join("\n") : undefined;
  }
}

/** `invalid URI <filename>` with the URI Usage hint. */
export function invalidUri(filename: string): GlusterError {
  return new GlusterError(`invalid URI ${filename}`, { usage: GLUSTER_URI_USAGE });
}
