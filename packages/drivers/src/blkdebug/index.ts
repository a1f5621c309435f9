/**
 * The `blkdebug` filter: fault injection for tests. Rules fail requests with a chosen errno: QEMU's
 * `inject-error` rules (activated by an `event`, optionally limited to an `iotype` and a `sector`, `once`
 * or not) and an easier library API ({@link BlkdebugState.inject}: the N-th request of some kinds, or
 * any request touching a byte range, once or always).
 *
 * Events: blk's format drivers do not emit QEMU's debug events yet, so the filter raises the events its
 * own requests correspond to before checking the rules: `read_aio`/`preadv` for reads, `write_aio`/
 * `pwritev` for writes, `pwritev_zero` for write-zeroes, `flush_to_os`/`flush_to_disk` for flushes.
 * A parent may raise any other event with {@link BlkdebugState.event}.
 */
import {
  BlkError,
  type BlkErrorCode,
  type BlockDriver,
  BlockDriverBase,
  type BlockStatusExtent,
  CHILD_ROLE,
  type Edge,
  ERRNO,
  type OpenContext,
  PERM_ALL,
  strerror,
  type WriteFlags,
  type ZeroFlags,
} from "@blk/core";
import { BlkdebugEvent } from "@blk/qmp";
import {
  expectBool,
  expectEnum,
  expectInt,
  expectObject,
  expectString,
  rejectUnexpected,
} from "../registry/options.ts";

/** QEMU's `BlkdebugIOType`. */
export type BlkdebugIoType = "read" | "write" | "write-zeroes" | "discard" | "flush" | "block-status";

const IO_TYPES: readonly BlkdebugIoType[] = [
  "read",
  "write",
  "write-zeroes",
  "discard",
  "flush",
  "block-status",
];
/** QEMU's default `iotype` mask: everything but block-status. */
const DEFAULT_IO_TYPES: readonly BlkdebugIoType[] = ["read", "write", "write-zeroes", "discard", "flush"];

/** QEMU's `BlkdebugEvent` names (7.2), as `@blk/qmp`'s schema declares them. */
export const BLKDEBUG_EVENTS: readonly string[] = BlkdebugEvent.values;

/** QEMU's `BlkdebugInjectErrorOptions`. */
export interface BlkdebugInjectError {
  /** The event that activates the rule. */
  event: string;
  /** Only in this blkdebug state (default: any). */
  state?: number;
  /** Only requests of this type (default: all but block-status). */
  iotype?: BlkdebugIoType;
  /** Error number to fail with (Linux errno; default 5 = EIO). */
  errno?: number;
  /** Only requests covering this 512-byte sector (default: any). */
  sector?: number;
  /** Remove the rule after it fired once (default false). */
  once?: boolean;
  /** Fail without yielding first (default false; no observable difference in blk). */
  immediately?: boolean;
}

/** QEMU's `BlkdebugSetStateOptions` (`new_state` is spelled with an underscore in QEMU's schema). */
export interface BlkdebugSetState {
  event: string;
  state?: number;
  new_state: number;
}

/** `BlockdevOptionsBlkdebug` (the `image` child is passed as a graph child). */
export interface BlkdebugOptions {
  /** Request alignment in bytes (power of two). */
  align?: number;
  /** Largest request in bytes. */
  "max-transfer"?: number;
  "inject-error"?: BlkdebugInjectError[];
  "set-state"?: BlkdebugSetState[];
  /** Accepted; the hints are not used. */
  "opt-write-zero"?: number;
  "max-write-zero"?: number;
  "opt-discard"?: number;
  "max-discard"?: number;
  /** A blkdebug config file: not supported (ENOTSUP). */
  config?: string;
  /** Extra permissions on the child: not supported when non-empty (ENOTSUP). */
  "take-child-perms"?: string[];
  /** Permissions not shared on the child: not supported when non-empty (ENOTSUP). */
  "unshare-child-perms"?: string[];
}

/** A rule of the library API ({@link BlkdebugState.inject}). */
export interface FaultRule {
  /** Request kinds the rule applies to (default: all but block-status). */
  on?: BlkdebugIoType | readonly BlkdebugIoType[];
  /** Fail only the N-th matching request (1-based, counted from when the rule is added). */
  nth?: number;
  /** Fail only requests overlapping this byte range. */
  range?: { offset: number; bytes: number };
  /** The error code (default `EIO`). */
  errno?: BlkErrorCode;
  /** Remove the rule after it fired once (default: true with `nth`, false otherwise). */
  once?: boolean;
}

/** A live library rule. */
export interface FaultHandle {
  /** How many requests the rule failed. */
  readonly hits: number;
  /** How many requests matched its kinds and range (failed or not). */
  readonly seen: number;
  /** Removes the rule. */
  remove(): void;
}

interface Rule {
  kinds: ReadonlySet<BlkdebugIoType>;
  offset: number | undefined;
  bytes: number;
  code: BlkErrorCode;
  once: boolean;
  nth: number | undefined;
  seen: number;
  hits: number;
  /** QEMU rules: needs activation by its event. */
  event: string | undefined;
  state: number | undefined;
  active: boolean;
  removed: boolean;
}

const CODE_BY_ERRNO = new Map<number, BlkErrorCode>(
  Object.entries(ERRNO).map(([k, v]) => [v, k as BlkErrorCode] as const),
);

/** The BlkError code of a Linux errno (EIO for numbers blk has no code for). */
export function codeOfErrno(errno: number): BlkErrorCode {
  return CODE_BY_ERRNO.get(errno) ?? "EIO";
}

/** The open state of a `blkdebug` node. */
export class BlkdebugState extends BlockDriverBase {
  readonly #image: Edge;
  #rules: Rule[] = [];
  #setState: BlkdebugSetState[];
  #state = 1;

  /** @internal Use {@link blkdebugDriver}.open. */
  constructor(image: Edge, options: BlkdebugOptions) {
    super({ requestAlignment: options.align ?? 1, maxTransfer: options["max-transfer"] ?? 0 });
    this.#image = image;
    this.#setState = options["set-state"] ?? [];
    for (const r of options["inject-error"] ?? []) {
      const kinds = r.iotype === undefined ? DEFAULT_IO_TYPES : [r.iotype];
      this.#rules.push({
        kinds: new Set(kinds),
        offset: r.sector === undefined ? undefined : r.sector * 512,
        bytes: 512,
        code: codeOfErrno(r.errno ?? 5),
        once: r.once ?? false,
        nth: undefined,
        seen: 0,
        hits: 0,
        event: r.event,
        state: r.state,
        active: false,
        removed: false,
      });
    }
  }

  /** The current blkdebug state number (starts at 1). */
  get debugState(): number {
    return this.#state;
  }

  protected override supportsFua(): boolean {
    return true;
  }

  /**
   * Adds a fault rule.
   * @example
   * const h = dbg.inject({ on: "write", nth: 3, errno: "ENOSPC" }); // the third write fails, nothing else
   */
  inject(rule: FaultRule): FaultHandle {
    const on = rule.on === undefined ? DEFAULT_IO_TYPES : typeof rule.on === "string" ? [rule.on] : rule.on;
    for (const k of on) if (!IO_TYPES.includes(k)) throw new BlkError("EINVAL", `Unknown I/O type '${k}'`);
    if (rule.nth !== undefined && (!Number.isSafeInteger(rule.nth) || rule.nth < 1)) {
      throw new BlkError("EINVAL", "nth must be a positive integer");
    }
    const r: Rule = {
      kinds: new Set(on),
      offset: rule.range?.offset,
      bytes: rule.range?.bytes ?? 0,
      code: rule.errno ?? "EIO",
      once: rule.once ?? rule.nth !== undefined,
      nth: rule.nth,
      seen: 0,
      hits: 0,
      event: undefined,
      state: undefined,
      active: true,
      removed: false,
    };
    this.#rules.push(r);
    return {
      get hits() {
        return r.hits;
      },
      get seen() {
        return r.seen;
      },
      remove: () => this.#remove(r),
    };
  }

  /** Removes every rule. */
  clear(): void {
    for (const r of this.#rules) r.removed = true;
    this.#rules = [];
  }

  #remove(r: Rule): void {
    r.removed = true;
    this.#rules = this.#rules.filter((x) => x !== r);
  }

  /** Raises a debug event: activates the `inject-error` rules waiting for it and applies `set-state`. */
  event(name: string): void {
    for (const r of this.#rules) {
      if (r.event === name && (r.state === undefined || r.state === this.#state)) r.active = true;
    }
    let next = this.#state;
    for (const s of this.#setState) {
      if (s.event === name && (s.state === undefined || s.state === this.#state)) next = s.new_state;
    }
    this.#state = next;
  }

  #check(kind: BlkdebugIoType, offset: number, bytes: number): void {
    for (const r of this.#rules) {
      if (!r.active || !r.kinds.has(kind)) continue;
      if (r.offset !== undefined) {
        const len = Math.max(r.bytes, 1);
        const hit =
          r.event !== undefined
            ? bytes > 0 && r.offset >= offset && r.offset < offset + bytes
            : bytes > 0 && r.offset < offset + bytes && offset < r.offset + len;
        if (!hit) continue;
      }
      r.seen++;
      if (r.nth !== undefined && r.seen !== r.nth) continue;
      r.hits++;
      if (r.once) this.#remove(r);
      const msg = strerror(r.code);
      throw new BlkError(r.code, msg, { offset });
    }
  }

  protected override async _read(offset: number, buf: Uint8Array): Promise<void> {
    this.event("read_aio");
    this.#check("read", offset, buf.length);
    await this.#image.readInto(offset, buf);
  }

  protected override async _write(offset: number, data: Uint8Array, flags: WriteFlags): Promise<void> {
    this.event("write_aio");
    this.#check("write", offset, data.length);
    await this.#image.write(offset, data, { fua: flags.fua ?? false });
  }

  protected override async _writeZeroes(offset: number, bytes: number, flags: ZeroFlags): Promise<void> {
    this.event("pwritev_zero");
    this.#check("write-zeroes", offset, bytes);
    await this.#image.writeZeroes(offset, bytes, {
      mayUnmap: flags.mayUnmap ?? false,
      noFallback: flags.noFallback ?? false,
      fua: flags.fua ?? false,
    });
  }

  protected override async _discard(offset: number, bytes: number): Promise<void> {
    this.#check("discard", offset, bytes);
    await this.#image.discard(offset, bytes);
  }

  protected override async _flush(): Promise<void> {
    this.event("flush_to_os");
    this.event("flush_to_disk");
    this.#check("flush", 0, 0);
    await this.#image.flush();
  }

  protected override async _blockStatus(offset: number, bytes: number): Promise<BlockStatusExtent[]> {
    this.#check("block-status", offset, bytes);
    return this.#image.blockStatus(offset, bytes);
  }

  protected override async _getLength(): Promise<number> {
    return this.#image.length;
  }
}

/** Validates `blkdebug` options (without `image`) with QEMU's wording. */
export const blkdebugSchema: { parse(value: unknown): BlkdebugOptions } = {
  parse(value: unknown): BlkdebugOptions {
    const o = expectObject(value ?? {});
    const out: BlkdebugOptions = {};
    const align = expectInt(o, "align", 0);
    if (align !== undefined) {
      if (align === 0 || (align & (align - 1)) !== 0) {
        throw new BlkError("EINVAL", `Cannot meet constraints with align ${align}`);
      }
      out.align = align;
    }
    const mt = expectInt(o, "max-transfer", 0);
    if (mt !== undefined) out["max-transfer"] = mt;
    const ie = o["inject-error"];
    if (ie !== undefined) {
      if (!Array.isArray(ie))
        throw new BlkError("EINVAL", "Invalid parameter type for 'inject-error', expected: array");
      out["inject-error"] = ie.map((v: unknown, i: number) => {
        const r = expectObject(v, `inject-error[${i}]`);
        const event = expectString(r, "event", true);
        if (!BLKDEBUG_EVENTS.includes(event))
          throw new BlkError("EINVAL", `Parameter 'event' does not accept value '${event}'`);
        const rule: BlkdebugInjectError = { event };
        const state = expectInt(r, "state");
        if (state !== undefined) rule.state = state;
        const iotype = expectEnum(r, "iotype", IO_TYPES);
        if (iotype !== undefined) rule.iotype = iotype;
        const errno = expectInt(r, "errno");
        if (errno !== undefined) rule.errno = errno;
        const sector = expectInt(r, "sector");
        if (sector !== undefined) rule.sector = sector;
        const once = expectBool(r, "once");
        if (once !== undefined) rule.once = once;
        const imm = expectBool(r, "immediately");
        if (imm !== undefined) rule.immediately = imm;
        rejectUnexpected(r, ["event", "state", "iotype", "errno", "sector", "once", "immediately"]);
        return rule;
      });
    }
    const ss = o["set-state"];
    if (ss !== undefined) {
      if (!Array.isArray(ss))
        throw new BlkError("EINVAL", "Invalid parameter type for 'set-state', expected: array");
      out["set-state"] = ss.map((v: unknown, i: number) => {
        const r = expectObject(v, `set-state[${i}]`);
        const event = expectString(r, "event", true);
        const ns = expectInt(r, "new_state");
        if (ns === undefined) throw new BlkError("EINVAL", "Parameter 'new_state' is missing");
        const rule: BlkdebugSetState = { event, new_state: ns };
        const state = expectInt(r, "state");
        if (state !== undefined) rule.state = state;
        rejectUnexpected(r, ["event", "state", "new_state"]);
        return rule;
      });
    }
    for (const k of ["opt-write-zero", "max-write-zero", "opt-discard", "max-discard"] as const) {
      const v = expectInt(o, k);
      if (v !== undefined) out[k] = v;
    }
    const config = expectString(o, "config", false);
    if (config !== undefined) out.config = config;
    for (const k of ["take-child-perms", "unshare-child-perms"] as const) {
      const v = o[k];
      if (v === undefined) continue;
      if (!Array.isArray(v) || v.some((x) => typeof x !== "string")) {
        throw new BlkError("EINVAL", `Invalid parameter type for '${k}', expected: array`);
      }
      out[k] = v as string[];
    }
    rejectUnexpected(o, [
      "align",
      "max-transfer",
      "inject-error",
      "set-state",
      "opt-write-zero",
      "max-write-zero",
      "opt-discard",
      "max-discard",
      "config",
      "take-child-perms",
      "unshare-child-perms",
    ]);
    return out;
  },
};

/** The child role of blkdebug's `image` edge (QEMU: filtered, primary). */
export const BLKDEBUG_CHILD_ROLE: number = CHILD_ROLE.FILTERED | CHILD_ROLE.PRIMARY;

/**
 * The `blkdebug` filter driver. Its child is the graph child named `image` (or `file`).
 * @example
 * const dbg = await graph.open(blkdebugDriver, {}, { children: { image: { node, role: BLKDEBUG_CHILD_ROLE } } });
 * (dbg.state as BlkdebugState).inject({ on: "write", nth: 2, errno: "ENOSPC" });
 */
export const blkdebugDriver: BlockDriver<BlkdebugOptions> = {
  format: "blkdebug",
  kind: "filter",
  schema: blkdebugSchema,
  childOptions: [{ name: "image", role: CHILD_ROLE.FILTERED | CHILD_ROLE.PRIMARY }],
  async open(options: BlkdebugOptions, ctx: OpenContext): Promise<BlkdebugState> {
    const image = ctx.children.get("image") ?? ctx.children.get("file");
    if (image === undefined) throw new BlkError("EINVAL", "Parameter 'image' is missing");
    if (options.config !== undefined)
      throw new BlkError("ENOTSUP", "blkdebug config files are not supported");
    if ((options["take-child-perms"]?.length ?? 0) > 0 || (options["unshare-child-perms"]?.length ?? 0) > 0) {
      throw new BlkError("ENOTSUP", "take-child-perms and unshare-child-perms are not supported");
    }
    return new BlkdebugState(image, options);
  },
  childPerm(_role: number, perm: number, shared: number): { perm: number; shared: number } {
    // A filter: the parents' permissions pass through unchanged.
    return { perm: perm & PERM_ALL, shared: shared & PERM_ALL };
  },
};
