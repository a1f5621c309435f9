/** The blk block-node core. */

export {
  type CopyEndpoint,
  CopyEngine,
  type CopyEngineOptions,
  type CopyEngineStats,
  type CopyError,
  type CopyErrorAction,
  type CopyProgress,
  type CopyResult,
  type DataRun,
  STATUS_LOOKAHEAD,
} from "./copy.ts";
export {
  type BitmapCheck,
  type BlockDirtyInfo,
  checkBitmapGranularity,
  DirtyBitmap,
  type DirtyBitmapOptions,
} from "./dirty-bitmap.ts";
export {
  type BlockDriver,
  BlockDriverBase,
  type BlockDriverInfo,
  type BlockDriverState,
  type BlockLimits,
  type BlockStatusExtent,
  type BlockStatusFlags,
  type CheckResult,
  type ChildOptionDecl,
  type CopyRangeDest,
  type CopyRangeSource,
  type DriverCapabilities,
  type DriverKind,
  type FlushFlags,
  type OpenContext,
  type PersistentBitmap,
  type ReadFlags,
  type TruncateFlags,
  type WriteFlags,
  type ZeroFlags,
} from "./driver.ts";
export {
  BlkError,
  type BlkErrorCode,
  type BlkErrorOptions,
  ERRNO,
  isBlkError,
  strerror,
  toBlkError,
} from "./errors.ts";
export { FilterDriverState, filterDriver } from "./filter.ts";
export {
  type AttachOptions,
  BlockGraph,
  type BlockGraphInfo,
  type BlockGraphOptions,
  backendParent,
  type ChildSpec,
  checkNodeName,
  defaultRole,
  Edge,
  type ExternalParent,
  jobParent,
  type OpenNodeOptions,
  type Parent,
} from "./graph.ts";
export {
  BlockdevOptionsMemory,
  type BlockdevOptionsMemoryInput,
  type MemoryCounters,
  MemoryDriver,
  type MemoryDriverOptions,
  type MemoryRequest,
  memoryDriver,
} from "./memory.ts";
export {
  type BeforeWriteEvent,
  type BlockDeviceStats,
  BlockNode,
  type BlockStats,
  type BlockStatusAboveOptions,
  type NodeWriteOptions,
  type NodeZeroOptions,
  type RequestOptions,
  type WriteThresholdEvent,
} from "./node.ts";
export { DEFAULT_NODE_OPTIONS, type NodeOptions, resolveNodeOptions } from "./node-options.ts";
export {
  type CommonBlockdevOptions,
  CoreBlockdevOptions,
  type DriverTable,
  type InheritedOptions,
  inheritedOptions,
  nodeOptionsFromBlockdev,
  type OpenBlockdevOptions,
  openBlockdev,
  parseBlockdevOptions,
} from "./options.ts";
export {
  CHILD_ROLE,
  defaultChildPerm,
  PERM,
  PERM_ALL,
  type PermName,
  permDescription,
  permList,
  permMask,
} from "./perm.ts";
export {
  allocationDepth,
  type MapEntry,
  NBD_STATE_HOLE,
  NBD_STATE_ZERO,
  nbdAllocationFlags,
  toMapEntries,
  toMapEntry,
} from "./status.ts";
