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
  type CopyBeforeWriteHooks,
  type CopyBeforeWriteOptions,
  CopyBeforeWriteState,
  copyBeforeWriteDriver,
  type OnCbwError,
} from "./copy-before-write.ts";
