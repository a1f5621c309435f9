/** The backup job and its `copy-before-write` filter (QMP `blockdev-backup`). */
export {
  BackupJob,
  type BackupJobInit,
  type BackupOptions,
  type BackupPerf,
  type BackupSyncMode,
  type BitmapSyncMode,
  type BlockdevBackup,
  backup,
  createBackupJob,
} from "./backup.ts";
export {
  BACKUP_CLUSTER_SIZE_DEFAULT,
  backupClusterSize,
  CBW_DEFAULT_BUFFER_SIZE,
  CBW_GUEST_ACTIVE_WORKERS,
  type CbwBufferStats,
  type CopyBeforeWriteHooks,
  type CopyBeforeWriteOptions,
  CopyBeforeWriteState,
  copyBeforeWriteDriver,
  type OnCbwError,
} from "./copy-before-write.ts";
