/** The common node options (`BlockdevOptions` common members) and their defaults and checks. */
import { BlkError } from "./errors.ts";

/** The common node options with QEMU's semantics (`BlockdevOptions` common members, camel-cased). */
export interface NodeOptions {
  /** `read-only`: writes fail with `EPERM`, and nobody may take write permission. */
  readOnly: boolean;
  /** `auto-read-only`: a protocol driver may open read-only when read-write fails. */
  autoReadOnly: boolean;
  /** `force-share`: the node shares every permission (requires `readOnly`). */
  forceShare: boolean;
  /** `discard`: `ignore` (default) drops discard requests and the may-unmap flag; `unmap` passes them. */
  discard: "ignore" | "unmap";
  /** `detect-zeroes`: turn all-zero writes into write-zeroes (`unmap`: with may-unmap when discard=unmap). */
  detectZeroes: "off" | "on" | "unmap";
  /** `cache.direct` (recorded for drivers; `O_DIRECT` is the file driver's business). */
  cacheDirect: boolean;
  /** `cache.no-flush`: flushes do not reach stable storage. */
  cacheNoFlush: boolean;
}

/** Defaults of {@link NodeOptions}, as QEMU's. */
export const DEFAULT_NODE_OPTIONS: Readonly<NodeOptions> = Object.freeze({
  readOnly: false,
  autoReadOnly: false,
  forceShare: false,
  discard: "ignore",
  detectZeroes: "off",
  cacheDirect: false,
  cacheNoFlush: false,
});

/**
 * Fills in defaults of the common node options and applies QEMU's cross-option checks.
 * @throws {BlkError} EINVAL with QEMU's messages
 */
export function resolveNodeOptions(opts: Partial<NodeOptions>): NodeOptions {
  const o: NodeOptions = {
    readOnly: opts.readOnly ?? DEFAULT_NODE_OPTIONS.readOnly,
    autoReadOnly: opts.autoReadOnly ?? DEFAULT_NODE_OPTIONS.autoReadOnly,
    forceShare: opts.forceShare ?? DEFAULT_NODE_OPTIONS.forceShare,
    discard: opts.discard ?? DEFAULT_NODE_OPTIONS.discard,
    detectZeroes: opts.detectZeroes ?? DEFAULT_NODE_OPTIONS.detectZeroes,
    cacheDirect: opts.cacheDirect ?? DEFAULT_NODE_OPTIONS.cacheDirect,
    cacheNoFlush: opts.cacheNoFlush ?? DEFAULT_NODE_OPTIONS.cacheNoFlush,
  };
  if (o.forceShare && !o.readOnly) {
    throw new BlkError("EINVAL", "force-share=on can only be used with read-only images");
  }
  if (o.detectZeroes === "unmap" && o.discard !== "unmap") {
    throw new BlkError(
      "EINVAL",
      "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap",
    );
  }
  return o;
}
