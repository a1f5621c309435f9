/**
 * The QMP wire: QEMU-compatible streaming JSON reader and encoder, the command registry, the server and the
 * client.
 */
export {
  isQmpConnectionError,
  QMP_CONNECTION_ERROR_CODES,
  QmpClient,
  type QmpClientOptions,
  QmpConnectionError,
  type QmpConnectionErrorCode,
  type QmpConnectTarget,
  type QmpEvent,
  type QmpEventsOptions,
  type QmpExecuteOptions,
  type QmpGreeting,
  type QmpWaitEventOptions,
} from "./client.ts";
export { encodeQmpJson, formatDouble } from "./encode.ts";
export {
  QMP_JSON_DEFAULT_LIMITS,
  type QmpJsonLimits,
  type QmpJsonMessage,
  type QmpJsonObject,
  QmpJsonReader,
  type QmpJsonValue,
} from "./json.ts";
export { firstUnexpectedMember, qdictKeyOrder } from "./qdict.ts";
export {
  type CommandContext,
  type CommandDefinition,
  CommandRegistry,
  type CommandRegistryOptions,
  DEFAULT_QMP_VERSION,
  defineCommand,
  type QmpSessionHandle,
  type QmpVersionInfo,
  qmpCapabilitiesArgs,
  toQmpError,
} from "./registry.ts";
export {
  type QmpListenOptions,
  QmpServer,
  type QmpServerOptions,
  type QmpServerStats,
  QmpSession,
} from "./server.ts";
