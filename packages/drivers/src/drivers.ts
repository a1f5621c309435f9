/**
 * Aggregate exports of the `file`, `raw`, `null-co`, `blkdebug` and `throttle` drivers and the driver
 * registry (merged into the package entry point by the lead).
 */
export {
  BLKDEBUG_CHILD_ROLE,
  BLKDEBUG_EVENTS,
  type BlkdebugInjectError,
  type BlkdebugIoType,
  type BlkdebugOptions,
  type BlkdebugSetState,
  BlkdebugState,
  blkdebugDriver,
  blkdebugSchema,
  codeOfErrno,
  type FaultHandle,
  type FaultRule,
} from "./blkdebug/index.ts";
export {
  type FileCreateOptions,
  type FileDriverConfig,
  type FileOpenExtras,
  type FileOptions,
  FileState,
  type FileSyscalls,
  fileDriver,
  fileSchema,
  fileSize,
  ImageLockError,
  LOCK_BASE_PERM,
  LOCK_BASE_SHARED,
  lockBytes,
  makeFileDriver,
  type PreallocMode,
} from "./file/index.ts";
export {
  NULL_DEFAULT_SIZE,
  type NullOptions,
  NullState,
  nullAioDriver,
  nullDriver,
  nullSchema,
} from "./null/index.ts";
export {
  checkRawWindow,
  PROBED_RAW_WARNING,
  probedRawWarning,
  type RawOptions,
  RawState,
  rawChildRole,
  rawDriver,
  rawSchema,
} from "./raw/index.ts";
export {
  type BlockdevOptions,
  DriverRegistry,
  driverRegistry,
  getDriver,
  isNbdFilename,
  type OpenedImage,
  type OpenImageOptions,
  openBlockdev,
  openImage,
  PROBE_BUF_SIZE,
  probeFormat,
  registerDriver,
} from "./registry/index.ts";
export {
  makeThrottleDriver,
  THROTTLE_CHILD_ROLE,
  ThrottleFilterState,
  type ThrottleGroupLookup,
  type ThrottleOptions,
  throttleDriver,
  throttleGroups,
  throttleSchema,
} from "./throttle/index.ts";
