/**
 * The options layer: QEMU's `BlockdevOptions` (from `@blk/qmp`'s QAPI toolkit) turned into nodes, so one
 * validation serves `--blockdev`, `blockdev-add` and library calls. Common members map to
 * {@link NodeOptions} with QEMU's inheritance for inline children; child references (`file`, `backing`, …)
 * are opened inline (auto-named, not owned) or looked up by node name.
 */
import { BlockdevOptions, isQmpError } from "@blk/qmp";
import type { BlockDriver } from "./driver.ts";
import { BlkError } from "./errors.ts";
import { type BlockGraph, type ChildSpec, defaultRole } from "./graph.ts";
import { BlockdevOptionsMemory } from "./memory.ts";
import type { BlockNode } from "./node.ts";
import { type NodeOptions, resolveNodeOptions } from "./node-options.ts";
import { CHILD_ROLE } from "./perm.ts";

/** The common members of `BlockdevOptions`, as QAPI names them. */
export interface CommonBlockdevOptions {
  driver: string;
  "node-name"?: string;
  discard?: "ignore" | "unmap";
  cache?: { direct?: boolean; "no-flush"?: boolean };
  "read-only"?: boolean;
  "auto-read-only"?: boolean;
  "force-share"?: boolean;
  "detect-zeroes"?: "off" | "on" | "unmap";
}

const COMMON_KEYS = new Set([
  "driver",
  "node-name",
  "discard",
  "cache",
  "read-only",
  "auto-read-only",
  "force-share",
  "detect-zeroes",
]);

/**
 * `BlockdevOptions` with the core's own driver (`x-blk-memory`) added: validate `blockdev-add` arguments
 * and `--blockdev` values with it.
 */
export const CoreBlockdevOptions: typeof BlockdevOptions = BlockdevOptions.extend({
  variants: { "x-blk-memory": BlockdevOptionsMemory },
}) as unknown as typeof BlockdevOptions;

/**
 * Validates `value` as `BlockdevOptions` with QEMU's wording.
 * @throws {BlkError} EINVAL with the toolkit's (QEMU's) message
 */
export function parseBlockdevOptions(
  value: unknown,
  schema: { parse(v: unknown): unknown } = CoreBlockdevOptions,
): CommonBlockdevOptions {
  return parseWith(schema, value) as CommonBlockdevOptions;
}

function parseWith(schema: { parse(v: unknown): unknown }, v: unknown): unknown {
  try {
    return schema.parse(v);
  } catch (e) {
    if (isQmpError(e)) throw new BlkError("EINVAL", e.desc, { cause: e });
    throw e;
  }
}

/** Values a child inherits from its parent, before its own options apply (QEMU's option inheritance). */
export type InheritedOptions = Partial<
  Pick<NodeOptions, "readOnly" | "autoReadOnly" | "forceShare" | "discard" | "cacheDirect" | "cacheNoFlush">
>;

/**
 * The node options of one `BlockdevOptions` object: its own common members over what it inherited.
 * @throws {BlkError} EINVAL with QEMU's messages for invalid combinations
 */
export function nodeOptionsFromBlockdev(
  o: CommonBlockdevOptions,
  inherited: InheritedOptions = {},
): NodeOptions {
  const pick = <T>(own: T | undefined, inh: T | undefined): T | undefined => own ?? inh;
  const partial: Partial<NodeOptions> = {};
  const set = <K extends keyof NodeOptions>(k: K, v: NodeOptions[K] | undefined): void => {
    if (v !== undefined) partial[k] = v;
  };
  set("readOnly", pick(o["read-only"], inherited.readOnly));
  set("autoReadOnly", pick(o["auto-read-only"], inherited.autoReadOnly));
  set("forceShare", pick(o["force-share"], inherited.forceShare));
  set("discard", pick(o.discard, inherited.discard));
  set("detectZeroes", o["detect-zeroes"]);
  set("cacheDirect", pick(o.cache?.direct, inherited.cacheDirect));
  set("cacheNoFlush", pick(o.cache?.["no-flush"], inherited.cacheNoFlush));
  return resolveNodeOptions(partial);
}

/**
 * What a child of a node with options `parent` inherits through an edge of `role` (QEMU's rules):
 * every child inherits `cache.*` and `force-share`; a backing (COW) child defaults to read-only and
 * not auto-read-only; other children inherit `read-only` and `auto-read-only` and default to `discard=unmap`.
 */
export function inheritedOptions(parent: NodeOptions, role: number): InheritedOptions {
  const base: InheritedOptions = {
    cacheDirect: parent.cacheDirect,
    cacheNoFlush: parent.cacheNoFlush,
    forceShare: parent.forceShare,
  };
  if ((role & CHILD_ROLE.COW) !== 0) return { ...base, readOnly: true, autoReadOnly: false };
  return { ...base, readOnly: parent.readOnly, autoReadOnly: parent.autoReadOnly, discard: "unmap" };
}

/** A table of drivers by QAPI driver name (a `Map` will do). */
export interface DriverTable {
  get(name: string): BlockDriver<never> | undefined;
}

/** Options of {@link openBlockdev}. */
export interface OpenBlockdevOptions {
  /** The drivers by name. */
  drivers: DriverTable;
  /** Validate first (default true; pass false when the caller has already parsed the options). */
  validate?: boolean;
  /** Schema to validate with (default {@link CoreBlockdevOptions}). */
  schema?: { parse(v: unknown): unknown };
  /** `blockdev-add`: the root must be named (`'node-name' must be specified for the root node`). */
  requireNodeName?: boolean;
}

/**
 * Opens a node (and its inline children) from `BlockdevOptions`: the same path for `blockdev-add`,
 * `--blockdev` and library calls. Inline children are auto-named and go away with their parent; string
 * references name existing nodes. On failure, children opened for it are deleted again.
 * @throws {BlkError} EINVAL for invalid options (QEMU's messages), ENOENT for a missing referenced node,
 * EPERM for permission conflicts
 * @example
 * const node = await openBlockdev(graph, { driver: "x-blk-memory", "node-name": "m", size: 1048576 },
 *   { drivers: new Map([["x-blk-memory", memoryDriver]]) });
 */
export async function openBlockdev(
  graph: BlockGraph,
  value: unknown,
  options: OpenBlockdevOptions,
): Promise<BlockNode> {
  const o =
    options.validate === false
      ? (value as CommonBlockdevOptions)
      : parseBlockdevOptions(value, options.schema);
  if (options.requireNodeName === true && o["node-name"] === undefined) {
    throw new BlkError("EINVAL", "'node-name' must be specified for the root node");
  }
  return openOne(graph, o, {}, options.drivers, true);
}

async function openOne(
  graph: BlockGraph,
  o: CommonBlockdevOptions,
  inherited: InheritedOptions,
  drivers: DriverTable,
  owned: boolean,
): Promise<BlockNode> {
  const driver = drivers.get(o.driver);
  if (driver === undefined) throw new BlkError("EINVAL", `Unknown driver '${o.driver}'`);
  const nodeOptions = nodeOptionsFromBlockdev(o, inherited);
  const record = o as unknown as Record<string, unknown>;
  const childKeys = new Set<string>();
  const children: Record<string, ChildSpec> = {};
  const opened: BlockNode[] = [];
  try {
    for (const decl of driver.childOptions ?? []) {
      childKeys.add(decl.name);
      const v = record[decl.name];
      if (v === undefined || v === null) continue;
      const role = decl.role ?? defaultRole(driver.kind, decl.name);
      if (typeof v === "string") {
        const node = graph.find(v);
        if (node === undefined)
          throw new BlkError("ENOENT", `Cannot find device='${v}' nor node-name='${v}'`);
        children[decl.name] = { node, role };
      } else {
        const child = await openOne(
          graph,
          v as CommonBlockdevOptions,
          inheritedOptions(nodeOptions, role),
          drivers,
          false,
        );
        opened.push(child);
        children[decl.name] = { node: child, role };
      }
    }
    const driverOptions: Record<string, unknown> = {};
    for (const [k, v] of Object.entries(record)) {
      if (!COMMON_KEYS.has(k) && !childKeys.has(k)) driverOptions[k] = v;
    }
    const nodeName = o["node-name"];
    const parsed = driver.schema === undefined ? driverOptions : parseWith(driver.schema, driverOptions);
    return await graph.open(driver, parsed as never, {
      ...nodeOptions,
      ...(nodeName === undefined ? {} : { nodeName }),
      children,
      owned,
    });
  } catch (e) {
    for (const c of opened.reverse()) if (c.parents.length === 0) await graph.delete(c);
    throw e;
  }
}
