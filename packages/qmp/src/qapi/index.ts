/**
 * The QAPI toolkit: schema DSL ({@link q}), QEMU-worded validation of QMP JSON and command-line (keyval) input,
 * the keyval parser, introspection, and a starter set of block-layer schemas.
 */
export { type QapiDsl, q } from "./dsl.ts";
export { QAPI_MESSAGES, qapiError } from "./errors.ts";
export { SchemaCatalog, type SchemaCatalogOptions } from "./introspect.ts";
export {
  formatKeyval,
  type KeyvalObject,
  type KeyvalOptions,
  type KeyvalParseResult,
  type KeyvalValue,
  type OptionArgumentOptions,
  parseKeyval,
  parseKeyvalWithHelp,
  parseOptionArgument,
  QSD_IMPLIED_KEYS,
} from "./keyval.ts";
export { parseBool, parseInt64, parseNumber, parseSize, parseUint64 } from "./numbers.ts";
export * from "./schemas/index.ts";
export {
  AlternateType,
  type Branches,
  type BuiltinName,
  BuiltinType,
  childPath,
  EnumType,
  fullName,
  type Infer,
  type InferInput,
  type InferInputMembers,
  type InferMembers,
  type InferUnion,
  type InferUnionInput,
  type JsonKind,
  jsonKind,
  LazyType,
  ListType,
  MAX_NESTING,
  type Member,
  type Members,
  ObjectType,
  Optional,
  type ParseOptions,
  type QapiKind,
  type QapiPath,
  QapiType,
  type SchemaInfo,
  shortName,
  UnionType,
  type Variants,
  type VisitContext,
  type VisitMode,
  type WithDefaults,
} from "./types.ts";
