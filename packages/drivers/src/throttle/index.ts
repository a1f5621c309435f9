/**
 * The `throttle` filter driver (QEMU's block/throttle.c): every request is admitted by a member of a
 * throttle group (`@blk/throttle`) before it reaches the `file` child — reads as reads; writes,
 * write-zeroes and discards as writes of their length; flush and block status are not throttled. While
 * drained (and when closing) the member's limits are bypassed, as QEMU does.
 */
import {
  BlkError,
  type BlockDriver,
  BlockDriverBase,
  type BlockStatusExtent,
  CHILD_ROLE,
  type Edge,
  type OpenContext,
  PERM_ALL,
  type WriteFlags,
  type ZeroFlags,
} from "@blk/core";
import type { ThrottleGroup, ThrottleGroupMember } from "@blk/throttle";
import { expectObject, expectString, rejectUnexpected } from "../registry/options.ts";

/** `BlockdevOptionsThrottle` (the `file` child is passed as a graph child). */
export interface ThrottleOptions {
  /** Name of an existing throttle group. */
  "throttle-group": string;
}

/** Where the filter finds groups by name (a `Map<string, ThrottleGroup>` will do). */
export interface ThrottleGroupLookup {
  get(name: string): ThrottleGroup | undefined;
}

/** The open state of a `throttle` node. */
export class ThrottleFilterState extends BlockDriverBase {
  readonly #file: Edge;
  readonly member: ThrottleGroupMember;

  /** @internal Use the driver's open. */
  constructor(file: Edge, group: ThrottleGroup) {
    super();
    this.#file = file;
    this.member = group.join();
  }

  /** The group this node belongs to. */
  get group(): ThrottleGroup {
    return this.member.group;
  }

  protected override supportsFua(): boolean {
    return true;
  }

  protected override async _read(offset: number, buf: Uint8Array): Promise<void> {
    await this.member.intercept(buf.length, false);
    await this.#file.readInto(offset, buf);
  }

  protected override async _write(offset: number, data: Uint8Array, flags: WriteFlags): Promise<void> {
    await this.member.intercept(data.length, true);
    await this.#file.write(offset, data, { fua: flags.fua ?? false });
  }

  protected override async _writeZeroes(offset: number, bytes: number, flags: ZeroFlags): Promise<void> {
    await this.member.intercept(bytes, true);
    await this.#file.writeZeroes(offset, bytes, {
      mayUnmap: flags.mayUnmap ?? false,
      noFallback: flags.noFallback ?? false,
      fua: flags.fua ?? false,
    });
  }

  protected override async _discard(offset: number, bytes: number): Promise<void> {
    await this.member.intercept(bytes, true);
    await this.#file.discard(offset, bytes);
  }

  protected override async _flush(): Promise<void> {
    await this.#file.flush();
  }

  protected override async _blockStatus(offset: number, bytes: number): Promise<BlockStatusExtent[]> {
    return this.#file.blockStatus(offset, bytes);
  }

  protected override async _getLength(): Promise<number> {
    return this.#file.length;
  }

  override async drained<T>(fn: () => Promise<T> | T): Promise<T> {
    const undo = this.member.disableLimits();
    try {
      return await super.drained(fn);
    } finally {
      undo();
    }
  }

  override close(): Promise<void> {
    if (!this.member.left) this.member.disableLimits();
    return super.close();
  }

  protected override async _close(): Promise<void> {
    this.member.leave();
  }
}

/** Validates `throttle` options (without `file`) with QEMU's wording. */
export const throttleSchema: { parse(value: unknown): ThrottleOptions } = {
  parse(value: unknown): ThrottleOptions {
    const o = expectObject(value ?? {});
    const out: ThrottleOptions = { "throttle-group": expectString(o, "throttle-group", true) };
    rejectUnexpected(o, ["throttle-group"]);
    return out;
  },
};

/** The child role of the throttle filter's `file` edge. */
export const THROTTLE_CHILD_ROLE: number = CHILD_ROLE.FILTERED | CHILD_ROLE.PRIMARY;

/**
 * Builds a `throttle` driver that finds groups in `groups` (the daemon passes its `throttle-group`
 * objects).
 * @example
 * const groups = new Map([["tg0", new ThrottleGroup({ name: "tg0", config })]]);
 * const drv = makeThrottleDriver(groups);
 * const thr = await graph.open(drv, { "throttle-group": "tg0" }, { children: { file: node } });
 */
export function makeThrottleDriver(groups: ThrottleGroupLookup): BlockDriver<ThrottleOptions> {
  return {
    format: "throttle",
    kind: "filter",
    schema: throttleSchema,
    childOptions: [{ name: "file", role: CHILD_ROLE.FILTERED | CHILD_ROLE.PRIMARY }],
    async open(options: ThrottleOptions, ctx: OpenContext): Promise<ThrottleFilterState> {
      const name = options["throttle-group"];
      if (typeof name !== "string") throw new BlkError("EINVAL", "Parameter 'throttle-group' is missing");
      const file = ctx.children.get("file");
      if (file === undefined) throw new BlkError("EINVAL", "Parameter 'file' is missing");
      const group = groups.get(name);
      if (group === undefined) throw new BlkError("EINVAL", `Throttle group '${name}' does not exist`);
      return new ThrottleFilterState(file, group);
    },
    childPerm(_role: number, perm: number, shared: number): { perm: number; shared: number } {
      return { perm: perm & PERM_ALL, shared: shared & PERM_ALL };
    },
  };
}

/** Throttle groups known to {@link throttleDriver} (add yours here, or build a driver with your own lookup). */
export const throttleGroups: Map<string, ThrottleGroup> = new Map();

/** The `throttle` filter driver over {@link throttleGroups}. */
export const throttleDriver: BlockDriver<ThrottleOptions> = makeThrottleDriver(throttleGroups);
