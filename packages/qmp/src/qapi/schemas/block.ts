/**
 * `BlockdevOptions` and its parts (QEMU 7.2 `qapi/block-core.json`, as introspected from qemu-storage-daemon
 * 7.2.22): the one schema behind `blockdev-add`, `--blockdev` (keyval or JSON) and library calls. Defaults are
 * the C handlers' (spec/qmp.md §3.2); members whose default depends on other options have none.
 *
 * Only the drivers blk implements are in the `driver` enum; `@blk/core` adds more with
 * `BlockdevOptions.extend({ variants: { … } })`.
 */
import { q } from "../dsl.ts";
import type {
  EnumType,
  InferUnion,
  InferUnionInput,
  ObjectType,
  QapiType,
  UnionType,
  WithDefaults,
} from "../types.ts";
import { SocketAddress } from "./socket.ts";

// ---------------------------------------------------------------------------------------------------------
// Enums

/** `BlockdevDriver`, restricted to the drivers blk implements. */
export type BlockdevDriver =
  | "blkdebug"
  | "copy-before-write"
  | "copy-on-read"
  | "file"
  | "nbd"
  | "null-aio"
  | "null-co"
  | "qcow2"
  | "raw"
  | "throttle";
/** `BlockdevDriver` schema. */
export const BlockdevDriver: EnumType<BlockdevDriver> = q.enum(
  [
    "blkdebug",
    "copy-before-write",
    "copy-on-read",
    "file",
    "nbd",
    "null-aio",
    "null-co",
    "qcow2",
    "raw",
    "throttle",
  ],
  { name: "BlockdevDriver" },
);

/** `BlockdevDiscardOptions`. */
export type BlockdevDiscardOptions = "ignore" | "unmap";
/** `BlockdevDiscardOptions` schema. */
export const BlockdevDiscardOptions: EnumType<BlockdevDiscardOptions> = q.enum(["ignore", "unmap"], {
  name: "BlockdevDiscardOptions",
});

/** `BlockdevDetectZeroesOptions`. */
export type BlockdevDetectZeroesOptions = "off" | "on" | "unmap";
/** `BlockdevDetectZeroesOptions` schema. */
export const BlockdevDetectZeroesOptions: EnumType<BlockdevDetectZeroesOptions> = q.enum(
  ["off", "on", "unmap"],
  {
    name: "BlockdevDetectZeroesOptions",
  },
);

/** `OnOffAuto`. */
export type OnOffAuto = "auto" | "on" | "off";
/** `OnOffAuto` schema. */
export const OnOffAuto: EnumType<OnOffAuto> = q.enum(["auto", "on", "off"], { name: "OnOffAuto" });

/** `BlockdevAioOptions`. */
export type BlockdevAioOptions = "threads" | "native" | "io_uring";
/** `BlockdevAioOptions` schema. */
export const BlockdevAioOptions: EnumType<BlockdevAioOptions> = q.enum(["threads", "native", "io_uring"], {
  name: "BlockdevAioOptions",
});

/** `Qcow2OverlapCheckMode`. */
export type Qcow2OverlapCheckMode = "none" | "constant" | "cached" | "all";
/** `Qcow2OverlapCheckMode` schema. */
export const Qcow2OverlapCheckMode: EnumType<Qcow2OverlapCheckMode> = q.enum(
  ["none", "constant", "cached", "all"],
  {
    name: "Qcow2OverlapCheckMode",
  },
);

/** `OnCbwError`. */
export type OnCbwError = "break-guest-write" | "break-snapshot";
/** `OnCbwError` schema. */
export const OnCbwError: EnumType<OnCbwError> = q.enum(["break-guest-write", "break-snapshot"], {
  name: "OnCbwError",
});

/** `BlockPermission`. */
export type BlockPermission = "consistent-read" | "write" | "write-unchanged" | "resize";
/** `BlockPermission` schema. */
export const BlockPermission: EnumType<BlockPermission> = q.enum(
  ["consistent-read", "write", "write-unchanged", "resize"],
  { name: "BlockPermission" },
);

const BLKDEBUG_EVENTS = [
  "l1_update",
  "l1_grow_alloc_table",
  "l1_grow_write_table",
  "l1_grow_activate_table",
  "l2_load",
  "l2_update",
  "l2_update_compressed",
  "l2_alloc_cow_read",
  "l2_alloc_write",
  "read_aio",
  "read_backing_aio",
  "read_compressed",
  "write_aio",
  "write_compressed",
  "vmstate_load",
  "vmstate_save",
  "cow_read",
  "cow_write",
  "reftable_load",
  "reftable_grow",
  "reftable_update",
  "refblock_load",
  "refblock_update",
  "refblock_update_part",
  "refblock_alloc",
  "refblock_alloc_hookup",
  "refblock_alloc_write",
  "refblock_alloc_write_blocks",
  "refblock_alloc_write_table",
  "refblock_alloc_switch_table",
  "cluster_alloc",
  "cluster_alloc_bytes",
  "cluster_free",
  "flush_to_os",
  "flush_to_disk",
  "pwritev_rmw_head",
  "pwritev_rmw_after_head",
  "pwritev_rmw_tail",
  "pwritev_rmw_after_tail",
  "pwritev",
  "pwritev_zero",
  "pwritev_done",
  "empty_image_prepare",
  "l1_shrink_write_table",
  "l1_shrink_free_l2_clusters",
  "cor_write",
  "cluster_alloc_space",
  "none",
] as const;
/** `BlkdebugEvent`: the points where blkdebug can inject errors or change state. */
export type BlkdebugEvent = (typeof BLKDEBUG_EVENTS)[number];
/** `BlkdebugEvent` schema. */
export const BlkdebugEvent: EnumType<BlkdebugEvent> = q.enum(BLKDEBUG_EVENTS, { name: "BlkdebugEvent" });

/** `BlkdebugIOType`. */
export type BlkdebugIOType = "read" | "write" | "write-zeroes" | "discard" | "flush" | "block-status";
/** `BlkdebugIOType` schema. */
export const BlkdebugIOType: EnumType<BlkdebugIOType> = q.enum(
  ["read", "write", "write-zeroes", "discard", "flush", "block-status"],
  { name: "BlkdebugIOType" },
);

// ---------------------------------------------------------------------------------------------------------
// Common members

/** `BlockdevCacheOptions`. */
export interface BlockdevCacheOptions {
  direct?: boolean;
  "no-flush"?: boolean;
}
/**
 * `BlockdevCacheOptions` schema (`cache.direct`, `cache.no-flush`). No defaults here: absent members are
 * inherited from the parent node, false at the root.
 */
export const BlockdevCacheOptions: ObjectType<BlockdevCacheOptions> = q.object(
  { direct: q.optional(q.bool()), "no-flush": q.optional(q.bool()) },
  { name: "BlockdevCacheOptions" },
);

/**
 * The members every `BlockdevOptions` has. None has a schema default: QEMU's defaults (`discard=ignore`,
 * `read-only`/`auto-read-only`/`force-share` false, `detect-zeroes=off`, `cache.*` false) apply at the root,
 * while an inline child inherits what its parent has (QEMU's option inheritance), so absence must stay visible.
 */
export interface BlockdevOptionsBase {
  driver: BlockdevDriver;
  "node-name"?: string;
  discard?: BlockdevDiscardOptions;
  cache?: BlockdevCacheOptions;
  "read-only"?: boolean;
  "auto-read-only"?: boolean;
  "force-share"?: boolean;
  "detect-zeroes"?: BlockdevDetectZeroesOptions;
}
/** Schema of the common members (the union's base). */
export const BlockdevOptionsBase: ObjectType<BlockdevOptionsBase> = q.object({
  driver: BlockdevDriver,
  "node-name": q.optional(q.str()),
  discard: q.optional(BlockdevDiscardOptions),
  cache: q.optional(BlockdevCacheOptions),
  "read-only": q.optional(q.bool()),
  "auto-read-only": q.optional(q.bool()),
  "force-share": q.optional(q.bool()),
  "detect-zeroes": q.optional(BlockdevDetectZeroesOptions),
});

// ---------------------------------------------------------------------------------------------------------
// References to nodes

/** `BlockdevRef`: inline options (a new, auto-named child) or the node-name of an existing node. */
export type BlockdevRef = BlockdevOptions | string;
/** What library callers may pass as a {@link BlockdevRef} (members with defaults optional). */
export type BlockdevRefInput = BlockdevOptionsInput | string;
/** `BlockdevRef` schema. */
export const BlockdevRef: QapiType<BlockdevRef, BlockdevRefInput> = q.alternate("BlockdevRef", {
  definition: q.lazy(() => BlockdevOptions),
  reference: q.str(),
});

/** `BlockdevRefOrNull`: like {@link BlockdevRef}, or `null` for "no child" (qcow2 `backing`). */
export type BlockdevRefOrNull = BlockdevOptions | string | null;
/** What library callers may pass as a {@link BlockdevRefOrNull}. */
export type BlockdevRefOrNullInput = BlockdevOptionsInput | string | null;
/** `BlockdevRefOrNull` schema. */
export const BlockdevRefOrNull: QapiType<BlockdevRefOrNull, BlockdevRefOrNullInput> = q.alternate(
  "BlockdevRefOrNull",
  {
    definition: q.lazy(() => BlockdevOptions),
    reference: q.str(),
    null: q.null(),
  },
);

/** `BlockDirtyBitmap`: a bitmap named by node and name. */
export interface BlockDirtyBitmap {
  node: string;
  name: string;
}
/** `BlockDirtyBitmap` schema. */
export const BlockDirtyBitmap: ObjectType<BlockDirtyBitmap> = q.object(
  { node: q.str(), name: q.str() },
  { name: "BlockDirtyBitmap" },
);

// ---------------------------------------------------------------------------------------------------------
// Driver options

/** `BlockdevOptionsFile` (driver `file`). */
export interface BlockdevOptionsFile {
  filename: string;
  "pr-manager"?: string;
  locking: OnOffAuto;
  aio: BlockdevAioOptions;
  "aio-max-batch": number;
  "drop-cache": boolean;
  "x-check-cache-dropped": boolean;
}
/** Input side of {@link BlockdevOptionsFile}. */
export type BlockdevOptionsFileInput = WithDefaults<
  BlockdevOptionsFile,
  "locking" | "aio" | "aio-max-batch" | "drop-cache" | "x-check-cache-dropped"
>;
/** `BlockdevOptionsFile` schema. */
export const BlockdevOptionsFile: ObjectType<BlockdevOptionsFile, BlockdevOptionsFileInput> = q.object(
  {
    filename: q.str(),
    "pr-manager": q.optional(q.str()),
    locking: q.optional(OnOffAuto, "auto"),
    aio: q.optional(BlockdevAioOptions, "threads"),
    "aio-max-batch": q.optional(q.int(), 0),
    "drop-cache": q.optional(q.bool(), true),
    "x-check-cache-dropped": q.optional(q.bool(), false),
  },
  { name: "BlockdevOptionsFile" },
);

/** `BlockdevOptionsRaw` (driver `raw`). `size` absent = the rest of the file. */
export interface BlockdevOptionsRaw {
  file: BlockdevRef;
  offset: number;
  size?: number;
}
/** Input side of {@link BlockdevOptionsRaw}. */
export interface BlockdevOptionsRawInput {
  file: BlockdevRefInput;
  offset?: number;
  size?: number;
}
/** `BlockdevOptionsRaw` schema. */
export const BlockdevOptionsRaw: ObjectType<BlockdevOptionsRaw, BlockdevOptionsRawInput> = q.object(
  { file: BlockdevRef, offset: q.optional(q.int(), 0), size: q.optional(q.int()) },
  { name: "BlockdevOptionsRaw" },
);

/** `Qcow2OverlapCheckFlags`. */
export interface Qcow2OverlapCheckFlags {
  template?: Qcow2OverlapCheckMode;
  "main-header"?: boolean;
  "active-l1"?: boolean;
  "active-l2"?: boolean;
  "refcount-table"?: boolean;
  "refcount-block"?: boolean;
  "snapshot-table"?: boolean;
  "inactive-l1"?: boolean;
  "inactive-l2"?: boolean;
  "bitmap-directory"?: boolean;
}
/** `Qcow2OverlapCheckFlags` schema. */
export const Qcow2OverlapCheckFlags: ObjectType<Qcow2OverlapCheckFlags> = q.object(
  {
    template: q.optional(Qcow2OverlapCheckMode),
    "main-header": q.optional(q.bool()),
    "active-l1": q.optional(q.bool()),
    "active-l2": q.optional(q.bool()),
    "refcount-table": q.optional(q.bool()),
    "refcount-block": q.optional(q.bool()),
    "snapshot-table": q.optional(q.bool()),
    "inactive-l1": q.optional(q.bool()),
    "inactive-l2": q.optional(q.bool()),
    "bitmap-directory": q.optional(q.bool()),
  },
  { name: "Qcow2OverlapCheckFlags" },
);

/** `Qcow2OverlapChecks`: a mode name or per-structure flags. */
export type Qcow2OverlapChecks = Qcow2OverlapCheckFlags | Qcow2OverlapCheckMode;
/** `Qcow2OverlapChecks` schema. */
export const Qcow2OverlapChecks: QapiType<Qcow2OverlapChecks> = q.alternate("Qcow2OverlapChecks", {
  flags: Qcow2OverlapCheckFlags,
  mode: Qcow2OverlapCheckMode,
});

/** `BlockdevQcow2Encryption` (validated; blk does not implement encryption). */
export type BlockdevQcow2Encryption = { format: "aes" | "luks"; "key-secret"?: string };
/** `BlockdevQcow2Encryption` schema. */
export const BlockdevQcow2Encryption: QapiType<BlockdevQcow2Encryption> = q.union({
  name: "BlockdevQcow2Encryption",
  base: q.object({ format: q.enum(["aes", "luks"], { name: "BlockdevQcow2EncryptionFormat" }) }),
  discriminator: "format",
  variants: {
    aes: q.object({ "key-secret": q.optional(q.str()) }, { name: "QCryptoBlockOptionsQCow" }),
    luks: q.object({ "key-secret": q.optional(q.str()) }, { name: "QCryptoBlockOptionsLUKS" }),
  },
});

/**
 * `BlockdevOptionsQcow2` (driver `qcow2`). `backing` absent = the backing file named in the header, `null` =
 * none, a string = an existing node. `pass-discard-request` defaults to true iff `discard=unmap`.
 */
export interface BlockdevOptionsQcow2 {
  file: BlockdevRef;
  backing?: BlockdevRefOrNull;
  "lazy-refcounts"?: boolean;
  "pass-discard-request"?: boolean;
  "pass-discard-snapshot": boolean;
  "pass-discard-other": boolean;
  "overlap-check": Qcow2OverlapChecks;
  "cache-size"?: number;
  "l2-cache-size"?: number;
  "l2-cache-entry-size"?: number;
  "refcount-cache-size"?: number;
  "cache-clean-interval": number;
  encrypt?: BlockdevQcow2Encryption;
  "data-file"?: BlockdevRef;
}
/** Input side of {@link BlockdevOptionsQcow2}. */
export interface BlockdevOptionsQcow2Input
  extends WithDefaults<
    Omit<BlockdevOptionsQcow2, "file" | "backing" | "data-file">,
    "pass-discard-snapshot" | "pass-discard-other" | "overlap-check" | "cache-clean-interval"
  > {
  file: BlockdevRefInput;
  backing?: BlockdevRefOrNullInput;
  "data-file"?: BlockdevRefInput;
}
/** `BlockdevOptionsQcow2` schema. */
export const BlockdevOptionsQcow2: ObjectType<BlockdevOptionsQcow2, BlockdevOptionsQcow2Input> = q.object(
  {
    file: BlockdevRef,
    backing: q.optional(BlockdevRefOrNull),
    "lazy-refcounts": q.optional(q.bool()),
    "pass-discard-request": q.optional(q.bool()),
    "pass-discard-snapshot": q.optional(q.bool(), true),
    "pass-discard-other": q.optional(q.bool(), false),
    "overlap-check": q.optional(Qcow2OverlapChecks, "cached"),
    "cache-size": q.optional(q.int()),
    "l2-cache-size": q.optional(q.int()),
    "l2-cache-entry-size": q.optional(q.int()),
    "refcount-cache-size": q.optional(q.int()),
    "cache-clean-interval": q.optional(q.int(), 600),
    encrypt: q.optional(BlockdevQcow2Encryption),
    "data-file": q.optional(BlockdevRef),
  },
  { name: "BlockdevOptionsQcow2" },
);

/** `BlockdevOptionsNbd` (driver `nbd`). `export` absent = the default export `""`. */
export interface BlockdevOptionsNbd {
  server: SocketAddress;
  export?: string;
  "tls-creds"?: string;
  "tls-hostname"?: string;
  "x-dirty-bitmap"?: string;
  "reconnect-delay": number;
  "open-timeout": number;
}
/** Input side of {@link BlockdevOptionsNbd}. */
export type BlockdevOptionsNbdInput = WithDefaults<BlockdevOptionsNbd, "reconnect-delay" | "open-timeout">;
/** `BlockdevOptionsNbd` schema. */
export const BlockdevOptionsNbd: ObjectType<BlockdevOptionsNbd, BlockdevOptionsNbdInput> = q.object(
  {
    server: SocketAddress,
    export: q.optional(q.str()),
    "tls-creds": q.optional(q.str()),
    "tls-hostname": q.optional(q.str()),
    "x-dirty-bitmap": q.optional(q.str()),
    "reconnect-delay": q.optional(q.uint32(), 0),
    "open-timeout": q.optional(q.uint32(), 0),
  },
  { name: "BlockdevOptionsNbd" },
);

/** `BlockdevOptionsThrottle` (driver `throttle`): the group must already exist. */
export interface BlockdevOptionsThrottle {
  "throttle-group": string;
  file: BlockdevRef;
}
/** Input side of {@link BlockdevOptionsThrottle}. */
export interface BlockdevOptionsThrottleInput {
  "throttle-group": string;
  file: BlockdevRefInput;
}
/** `BlockdevOptionsThrottle` schema. */
export const BlockdevOptionsThrottle: ObjectType<BlockdevOptionsThrottle, BlockdevOptionsThrottleInput> =
  q.object({ "throttle-group": q.str(), file: BlockdevRef }, { name: "BlockdevOptionsThrottle" });

/** `BlockdevOptionsNull` (drivers `null-co`, `null-aio`). */
export interface BlockdevOptionsNull {
  size: number;
  "latency-ns": number;
  "read-zeroes": boolean;
}
/** Input side of {@link BlockdevOptionsNull}. */
export type BlockdevOptionsNullInput = Partial<BlockdevOptionsNull>;
/** `BlockdevOptionsNull` schema (`size` defaults to 1 GiB). */
export const BlockdevOptionsNull: ObjectType<BlockdevOptionsNull, BlockdevOptionsNullInput> = q.object(
  {
    size: q.optional(q.int(), 1073741824),
    "latency-ns": q.optional(q.uint64(), 0),
    "read-zeroes": q.optional(q.bool(), false),
  },
  { name: "BlockdevOptionsNull" },
);

/** `BlockdevOptionsGenericFormat` with `bottom` (driver `copy-on-read`). */
export interface BlockdevOptionsCor {
  file: BlockdevRef;
  bottom?: string;
}
/** Input side of {@link BlockdevOptionsCor}. */
export interface BlockdevOptionsCorInput {
  file: BlockdevRefInput;
  bottom?: string;
}
/** `BlockdevOptionsCor` schema. */
export const BlockdevOptionsCor: ObjectType<BlockdevOptionsCor, BlockdevOptionsCorInput> = q.object(
  { file: BlockdevRef, bottom: q.optional(q.str()) },
  { name: "BlockdevOptionsCor" },
);

/** `BlockdevOptionsCbw` (driver `copy-before-write`). */
export interface BlockdevOptionsCbw {
  file: BlockdevRef;
  target: BlockdevRef;
  bitmap?: BlockDirtyBitmap;
  "on-cbw-error": OnCbwError;
  "cbw-timeout": number;
}
/** Input side of {@link BlockdevOptionsCbw}. */
export interface BlockdevOptionsCbwInput
  extends WithDefaults<Omit<BlockdevOptionsCbw, "file" | "target">, "on-cbw-error" | "cbw-timeout"> {
  file: BlockdevRefInput;
  target: BlockdevRefInput;
}
/** `BlockdevOptionsCbw` schema. */
export const BlockdevOptionsCbw: ObjectType<BlockdevOptionsCbw, BlockdevOptionsCbwInput> = q.object(
  {
    file: BlockdevRef,
    target: BlockdevRef,
    bitmap: q.optional(BlockDirtyBitmap),
    "on-cbw-error": q.optional(OnCbwError, "break-guest-write"),
    "cbw-timeout": q.optional(q.uint32(), 0),
  },
  { name: "BlockdevOptionsCbw" },
);

/** `BlkdebugInjectErrorOptions`: one injected error (`errno` defaults to EIO = 5). */
export interface BlkdebugInjectErrorOptions {
  event: BlkdebugEvent;
  state?: number;
  iotype?: BlkdebugIOType;
  errno: number;
  sector?: number;
  once: boolean;
  immediately: boolean;
}
/** Input side of {@link BlkdebugInjectErrorOptions}. */
export type BlkdebugInjectErrorOptionsInput = WithDefaults<
  BlkdebugInjectErrorOptions,
  "errno" | "once" | "immediately"
>;
/** `BlkdebugInjectErrorOptions` schema. */
export const BlkdebugInjectErrorOptions: ObjectType<
  BlkdebugInjectErrorOptions,
  BlkdebugInjectErrorOptionsInput
> = q.object(
  {
    event: BlkdebugEvent,
    state: q.optional(q.int()),
    iotype: q.optional(BlkdebugIOType),
    errno: q.optional(q.int(), 5),
    sector: q.optional(q.int()),
    once: q.optional(q.bool(), false),
    immediately: q.optional(q.bool(), false),
  },
  { name: "BlkdebugInjectErrorOptions" },
);

/** `BlkdebugSetStateOptions`. */
export interface BlkdebugSetStateOptions {
  event: BlkdebugEvent;
  state?: number;
  new_state: number;
}
/** `BlkdebugSetStateOptions` schema. */
export const BlkdebugSetStateOptions: ObjectType<BlkdebugSetStateOptions> = q.object(
  { event: BlkdebugEvent, state: q.optional(q.int()), new_state: q.int() },
  { name: "BlkdebugSetStateOptions" },
);

/** `BlockdevOptionsBlkdebug` (driver `blkdebug`, for tests). */
export interface BlockdevOptionsBlkdebug {
  image: BlockdevRef;
  config?: string;
  align?: number;
  "max-transfer"?: number;
  "opt-write-zero"?: number;
  "max-write-zero"?: number;
  "opt-discard"?: number;
  "max-discard"?: number;
  "inject-error"?: BlkdebugInjectErrorOptions[];
  "set-state"?: BlkdebugSetStateOptions[];
  "take-child-perms"?: BlockPermission[];
  "unshare-child-perms"?: BlockPermission[];
}
/** Input side of {@link BlockdevOptionsBlkdebug}. */
export interface BlockdevOptionsBlkdebugInput
  extends Omit<BlockdevOptionsBlkdebug, "image" | "inject-error"> {
  image: BlockdevRefInput;
  "inject-error"?: BlkdebugInjectErrorOptionsInput[];
}
/** `BlockdevOptionsBlkdebug` schema. */
export const BlockdevOptionsBlkdebug: ObjectType<BlockdevOptionsBlkdebug, BlockdevOptionsBlkdebugInput> =
  q.object(
    {
      image: BlockdevRef,
      config: q.optional(q.str()),
      align: q.optional(q.int()),
      "max-transfer": q.optional(q.int32()),
      "opt-write-zero": q.optional(q.int32()),
      "max-write-zero": q.optional(q.int32()),
      "opt-discard": q.optional(q.int32()),
      "max-discard": q.optional(q.int32()),
      "inject-error": q.optional(q.list(BlkdebugInjectErrorOptions)),
      "set-state": q.optional(q.list(BlkdebugSetStateOptions)),
      "take-child-perms": q.optional(q.list(BlockPermission)),
      "unshare-child-perms": q.optional(q.list(BlockPermission)),
    },
    { name: "BlockdevOptionsBlkdebug" },
  );

// ---------------------------------------------------------------------------------------------------------
// The union

/** The variants of {@link BlockdevOptions}, by driver. */
export type BlockdevVariants = {
  blkdebug: ObjectType<BlockdevOptionsBlkdebug, BlockdevOptionsBlkdebugInput>;
  "copy-before-write": ObjectType<BlockdevOptionsCbw, BlockdevOptionsCbwInput>;
  "copy-on-read": ObjectType<BlockdevOptionsCor, BlockdevOptionsCorInput>;
  file: ObjectType<BlockdevOptionsFile, BlockdevOptionsFileInput>;
  nbd: ObjectType<BlockdevOptionsNbd, BlockdevOptionsNbdInput>;
  "null-aio": ObjectType<BlockdevOptionsNull, BlockdevOptionsNullInput>;
  "null-co": ObjectType<BlockdevOptionsNull, BlockdevOptionsNullInput>;
  qcow2: ObjectType<BlockdevOptionsQcow2, BlockdevOptionsQcow2Input>;
  raw: ObjectType<BlockdevOptionsRaw, BlockdevOptionsRawInput>;
  throttle: ObjectType<BlockdevOptionsThrottle, BlockdevOptionsThrottleInput>;
};

/** `BlockdevOptions`: the common members plus the driver's, e.g. `{driver: "qcow2", "node-name": "d", file: …}`. */
export type BlockdevOptions = InferUnion<BlockdevOptionsBase, "driver", BlockdevVariants>;

/** What library callers may pass as {@link BlockdevOptions}: members with a default are optional. */
export type BlockdevOptionsInput = InferUnionInput<BlockdevOptionsBase, "driver", BlockdevVariants>;

/**
 * `BlockdevOptions` schema: `blockdev-add`'s arguments and `--blockdev`'s value (implied key `driver`).
 * @example
 * parseOptionArgument(BlockdevOptions, "driver=qcow2,node-name=disk,file.driver=file,file.filename=/tmp/d.qcow2",
 *   { impliedKey: "driver" });
 */
export const BlockdevOptions: UnionType<BlockdevOptionsBase, "driver", BlockdevVariants> = q.union({
  name: "BlockdevOptions",
  base: BlockdevOptionsBase,
  discriminator: "driver",
  variants: {
    blkdebug: BlockdevOptionsBlkdebug,
    "copy-before-write": BlockdevOptionsCbw,
    "copy-on-read": BlockdevOptionsCor,
    file: BlockdevOptionsFile,
    nbd: BlockdevOptionsNbd,
    "null-aio": BlockdevOptionsNull,
    "null-co": BlockdevOptionsNull,
    qcow2: BlockdevOptionsQcow2,
    raw: BlockdevOptionsRaw,
    throttle: BlockdevOptionsThrottle,
  },
});
