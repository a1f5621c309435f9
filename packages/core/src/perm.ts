/**
 * QEMU's block permission model: what an edge (a parent's use of a child node) needs and what it lets
 * other parents do at the same time. Bit values are QEMU's `BLK_PERM_*`.
 */

/** Permission bits of an edge. */
export const PERM = {
  /** The parent needs reads that see the node's current, consistent data. */
  CONSISTENT_READ: 0x01,
  /** The parent may change the data the node's users see. */
  WRITE: 0x02,
  /** The parent may write data that is already there (copy-on-read, backup fleecing). */
  WRITE_UNCHANGED: 0x04,
  /** The parent may change the node's length. */
  RESIZE: 0x08,
} as const;

/** All permission bits. */
export const PERM_ALL = 0x0f;

/** QMP's `BlockPermission` enum names (`x-debug-query-block-graph` `perm` / `shared-perm`). */
export type PermName = "consistent-read" | "write" | "write-unchanged" | "resize";

const ORDER: readonly [number, PermName, string][] = [
  [PERM.CONSISTENT_READ, "consistent-read", "consistent read"],
  [PERM.WRITE, "write", "write"],
  [PERM.WRITE_UNCHANGED, "write-unchanged", "write unchanged"],
  [PERM.RESIZE, "resize", "resize"],
];

/**
 * The QMP list of a mask, in the order QEMU prints it (highest bit first, e.g.
 * `["resize", "write", "consistent-read"]`).
 */
export function permList(mask: number): PermName[] {
  const out: PermName[] = [];
  for (let i = ORDER.length - 1; i >= 0; i--) {
    const e = ORDER[i];
    if (e !== undefined && (mask & e[0]) !== 0) out.push(e[1]);
  }
  return out;
}

/** The mask of a list of QMP permission names. */
export function permMask(names: readonly PermName[]): number {
  let m = 0;
  for (const n of names) for (const e of ORDER) if (e[1] === n) m |= e[0];
  return m;
}

/** The wording QEMU uses for permissions in error messages (`"write, resize"`). */
export function permDescription(mask: number): string {
  const parts: string[] = [];
  for (const e of ORDER) if ((mask & e[0]) !== 0) parts.push(e[2]);
  return parts.join(", ");
}

/** Role bits of a child edge (QEMU's `BdrvChildRole`): decide the default permissions a parent takes. */
export const CHILD_ROLE = {
  /** The child holds guest data (raw's and qcow2's `file`). */
  DATA: 0x01,
  /** The child holds the parent's metadata (qcow2's `file`). */
  METADATA: 0x02,
  /** A filter's only child: data passes through unchanged. */
  FILTERED: 0x04,
  /** A backing file: read for copy-on-write only. */
  COW: 0x08,
  /** The primary child (`file` of a format, the filtered child of a filter). */
  PRIMARY: 0x10,
} as const;

/**
 * The permissions a parent node takes on a child by default, from the parent's own cumulative use.
 * These are QEMU's default rules: filtered children pass permissions through; storage children (data
 * and/or metadata) add write+resize when the parent is writable, always need consistent reads for
 * metadata and refuse to share write/resize; backing (COW) children only need consistent reads and
 * share everything but write/resize unless the parent shares write.
 */
export function defaultChildPerm(
  role: number,
  parentPerm: number,
  parentShared: number,
  parentWritable: boolean,
): { perm: number; shared: number } {
  const passthrough = PERM_ALL;
  if ((role & CHILD_ROLE.COW) !== 0) {
    const perm = parentPerm & PERM.CONSISTENT_READ;
    let shared = (parentShared & PERM.WRITE) !== 0 ? PERM.WRITE | PERM.RESIZE : 0;
    shared |= PERM.CONSISTENT_READ | PERM.WRITE_UNCHANGED;
    return { perm, shared };
  }
  let perm = parentPerm & passthrough;
  let shared = parentShared & passthrough;
  if ((role & CHILD_ROLE.METADATA) !== 0) {
    if (parentWritable) perm |= PERM.WRITE | PERM.RESIZE;
    perm |= PERM.CONSISTENT_READ;
    shared &= ~(PERM.WRITE | PERM.RESIZE);
  }
  if ((role & CHILD_ROLE.DATA) !== 0) {
    shared &= ~PERM.RESIZE;
    if ((perm & PERM.WRITE_UNCHANGED) !== 0) perm |= PERM.WRITE;
    if ((perm & PERM.WRITE) !== 0) perm |= PERM.RESIZE;
  }
  return { perm, shared };
}
