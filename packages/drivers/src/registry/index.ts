/**
 * The driver registry (format name → driver), QEMU's format probing, and {@link openImage}: one call
 * that builds the protocol node, probes or takes the format, and opens the format node above it over
 * core's {@link BlockGraph}.
 */
import {
  BlkError,
  type BlockDriver,
  BlockGraph,
  type BlockNode,
  backendParent,
  CHILD_ROLE,
  openBlockdev as coreOpenBlockdev,
  type DriverTable,
  type Edge,
  type NodeOptions,
  PERM,
  PERM_ALL,
} from "@blk/core";
import { blkdebugDriver } from "../blkdebug/index.ts";
import { fileDriver } from "../file/index.ts";
import { nbdDriver, parseNbdUri } from "../nbd/client/index.ts";
import { nullAioDriver, nullDriver } from "../null/index.ts";
import { openQcow2, qcow2Driver } from "../qcow2/index.ts";
import { probedRawWarning, type RawState, rawChildRole, rawDriver } from "../raw/index.ts";
import { throttleDriver } from "../throttle/index.ts";

/** QEMU reads this many bytes of an image to probe its format. */
export const PROBE_BUF_SIZE = 2048;

// biome-ignore lint/suspicious/noExplicitAny: a registry holds drivers of any option type
type AnyDriver = BlockDriver<any>;

/** A set of drivers by format name. */
export class DriverRegistry {
  readonly #drivers = new Map<string, AnyDriver>();

  /** @param drivers initial drivers */
  constructor(drivers: readonly AnyDriver[] = []) {
    for (const d of drivers) this.register(d);
  }

  /**
   * Adds a driver under its `format` name.
   * @throws {BlkError} EEXIST when the name is taken and `replace` is not set
   */
  register(driver: AnyDriver, options: { replace?: boolean } = {}): void {
    if (this.#drivers.has(driver.format) && options.replace !== true) {
      throw new BlkError("EEXIST", `Driver '${driver.format}' is already registered`);
    }
    this.#drivers.set(driver.format, driver);
  }

  /** Removes a driver; true when it was there. */
  unregister(format: string): boolean {
    return this.#drivers.delete(format);
  }

  /** The driver of `format`, or undefined. */
  get(format: string): AnyDriver | undefined {
    return this.#drivers.get(format);
  }

  /**
   * The driver of `format`.
   * @throws {BlkError} EINVAL `Unknown driver 'X'`
   */
  require(format: string): AnyDriver {
    const d = this.#drivers.get(format);
    if (d === undefined) throw new BlkError("EINVAL", `Unknown driver '${format}'`);
    return d;
  }

  /** Registered format names, in registration order. */
  formats(): string[] {
    return [...this.#drivers.keys()];
  }

  /**
   * QEMU's probing: every registered driver with a `probe` scores the header (0–100); the highest wins
   * (the first registered on a tie); `raw` when nobody scores, or for an empty image.
   */
  probe(header: Uint8Array, filename?: string): string {
    if (header.length === 0) return "raw";
    let best = "raw";
    let score = 0;
    for (const d of this.#drivers.values()) {
      if (d.probe === undefined) continue;
      const s = d.probe(header, filename);
      if (s > score) {
        score = s;
        best = d.format;
      }
    }
    return best;
  }
}

/** The default registry: `file`, `raw`, `qcow2`, `nbd`, `null-co`, `null-aio`, `blkdebug`, `throttle`. */
export const driverRegistry: DriverRegistry = new DriverRegistry([
  fileDriver,
  rawDriver,
  qcow2Driver,
  nbdDriver,
  nullDriver,
  nullAioDriver,
  blkdebugDriver,
  throttleDriver,
]);

/** Adds a driver to the default registry. @throws {BlkError} EEXIST */
export function registerDriver(driver: AnyDriver, options: { replace?: boolean } = {}): void {
  driverRegistry.register(driver, options);
}

/** The default registry's driver of `format`, or undefined. */
export function getDriver(format: string): AnyDriver | undefined {
  return driverRegistry.get(format);
}

/** Probes `header` against the default registry (see {@link DriverRegistry.probe}). */
export function probeFormat(header: Uint8Array, filename?: string): string {
  return driverRegistry.probe(header, filename);
}

/** QEMU's blockdev options object: `driver`, common options, children inline (objects) or by name. */
export interface BlockdevOptions {
  driver: string;
  "node-name"?: string;
  "read-only"?: boolean;
  "auto-read-only"?: boolean;
  "force-share"?: boolean;
  discard?: "ignore" | "unmap";
  "detect-zeroes"?: "off" | "on" | "unmap";
  cache?: { direct?: boolean; "no-flush"?: boolean };
  [key: string]: unknown;
}

/** Options of {@link openImage}. */
export interface OpenImageOptions {
  /** Format of the image; probed when omitted (a backing file whose format is known must pass it). */
  format?: string;
  /** Open read-only (default false). */
  readOnly?: boolean;
  /** Share every permission with other users, including other processes (`-U`; needs `readOnly`). */
  forceShare?: boolean;
  /** Node name of the format node (default generated). */
  nodeName?: string;
  /** `discard` of the nodes (default `ignore`). */
  discard?: NodeOptions["discard"];
  /** `detect-zeroes` of the format node (default `off`). */
  detectZeroes?: NodeOptions["detectZeroes"];
  /** `cache.no-flush` (default false). */
  cacheNoFlush?: boolean;
  /** `locking` of the `file` node (default `auto`). */
  locking?: "auto" | "on" | "off";
  /** Take the resize permission too (for `resize`). */
  resize?: boolean;
  /** Share only consistent-read and write-unchanged with other users (QEMU's `BDRV_O_NO_SHARE`). */
  noShare?: boolean;
  /** Graph to open the nodes in (default: a new one). */
  graph?: BlockGraph;
  /** Drivers to use (default: {@link driverRegistry}). */
  registry?: DriverRegistry;
  /** Called with each warning (QEMU's probed-raw warning) besides listing it in the result. */
  onWarning?: (message: string) => void;
}

/** What {@link openImage} returns: the nodes, the root edge holding the permissions, and `close()`. */
export interface OpenedImage extends AsyncDisposable {
  readonly graph: BlockGraph;
  /** The top (format) node: do I/O here, or through {@link OpenedImage.root}. */
  readonly node: BlockNode;
  /** The protocol node (`file`), when the image has one. */
  readonly file: BlockNode | undefined;
  /** The format of the top node. */
  readonly format: string;
  /** True when the format was probed (not given). */
  readonly probed: boolean;
  /** The edge of the user (an unnamed block backend) holding consistent-read (and write) permission. */
  readonly root: Edge;
  /** Warnings QEMU would print (the probed-raw warning). */
  readonly warnings: readonly string[];
  /** Detaches the user and deletes the nodes. Idempotent. */
  close(): Promise<void>;
}

function roleFor(driver: AnyDriver, childName: string, options: Record<string, unknown>): number | undefined {
  if (driver.format === "raw" && childName === "file") return rawChildRole(options);
  if (driver.kind === "filter" && (childName === "file" || childName === "image")) {
    return CHILD_ROLE.FILTERED | CHILD_ROLE.PRIMARY;
  }
  return undefined;
}

/**
 * Opens a node tree described by QEMU blockdev options (what `blockdev-add` takes) with the drivers of
 * `registry`: core's `openBlockdev` (QAPI validation with QEMU's wording, inline children auto-named and
 * deleted with their parent, string children naming existing nodes, QEMU's option inheritance).
 * @throws {BlkError} with QEMU's messages (`Unknown driver 'X'`, option validation, open failures)
 */
export function openBlockdev(
  graph: BlockGraph,
  options: BlockdevOptions,
  config: { registry?: DriverRegistry; validate?: boolean; requireNodeName?: boolean } = {},
): Promise<BlockNode> {
  return coreOpenBlockdev(graph, options, {
    // A registry holds drivers of any option type; core only calls `get`.
    drivers: (config.registry ?? driverRegistry) as unknown as DriverTable,
    validate: config.validate ?? true,
    requireNodeName: config.requireNodeName ?? false,
  });
}

/** Puts the common options of `openImage` on the root of a tree where the tree does not set them. */
function withCommon(tree: BlockdevOptions, base: Partial<NodeOptions>): BlockdevOptions {
  const out: BlockdevOptions = { ...tree };
  if (out["read-only"] === undefined && base.readOnly === true) out["read-only"] = true;
  if (out["force-share"] === undefined && base.forceShare === true) out["force-share"] = true;
  if (out.discard === undefined && base.discard !== undefined && base.discard !== "ignore")
    out.discard = base.discard;
  if (base.cacheNoFlush === true && out.cache?.["no-flush"] === undefined) {
    out.cache = { ...out.cache, "no-flush": true };
  }
  return out;
}

function parseFilename(filename: string): BlockdevOptions | undefined {
  if (!filename.startsWith("json:")) return undefined;
  let v: unknown;
  try {
    v = JSON.parse(filename.slice(5));
  } catch (e) {
    throw new BlkError("EINVAL", `Could not parse the JSON options`, { cause: e });
  }
  if (typeof v !== "object" || v === null || Array.isArray(v)) {
    throw new BlkError("EINVAL", "Invalid JSON object given");
  }
  return v as BlockdevOptions;
}

/**
 * Whether QEMU takes `filename` as an NBD URI rather than a file name (`nbd://`, `nbd+tcp://`,
 * `nbd+unix://`, `nbds…`, legacy `nbd:host:port[:exportname=X]`).
 */
export function isNbdFilename(filename: string): boolean {
  return /^nbds?(\+(tcp|unix))?:/i.test(filename);
}

/**
 * The protocol node of a filename that is an NBD URI as QEMU accepts one wherever a filename goes, else
 * undefined.
 * @throws {BlkError} EINVAL for a malformed NBD URI (QEMU's messages)
 */
function protocolFilename(filename: string): BlockdevOptions | undefined {
  if (!isNbdFilename(filename)) return undefined;
  return { driver: "nbd", ...parseNbdUri(filename) } as BlockdevOptions;
}

/**
 * Opens an image the way qemu-img/qemu-io do: a `file` node for a filename (or the tree given as
 * blockdev options or a `json:{…}` filename), the format given or probed on top (a probed raw image
 * opened writable gets QEMU's warning and its block-0 write restriction), and an unnamed block-backend
 * user holding consistent-read (+ write unless read-only, + resize when asked) on the top node.
 * @example
 * await using img = await openImage("disk.raw", { format: "raw" });
 * await img.root.write(0, new Uint8Array(512).fill(1));
 * @throws {BlkError} ENOENT `Could not open 'F': No such file or directory`; EINVAL `Unknown driver 'X'`;
 *   EAGAIN `Failed to get "write" lock` when another process holds the image
 */
export async function openImage(
  filenameOrOptions: string | BlockdevOptions,
  options: OpenImageOptions = {},
): Promise<OpenedImage> {
  const registry = options.registry ?? driverRegistry;
  const graph = options.graph ?? new BlockGraph();
  const readOnly = options.readOnly ?? false;
  const base: Partial<NodeOptions> = {
    readOnly,
    forceShare: options.forceShare ?? false,
    discard: options.discard ?? "ignore",
    cacheNoFlush: options.cacheNoFlush ?? false,
  };
  const warnings: string[] = [];
  const warn = (m: string): void => {
    warnings.push(m);
    options.onWarning?.(m);
  };
  const tree = typeof filenameOrOptions === "string" ? parseFilename(filenameOrOptions) : filenameOrOptions;
  let top: BlockNode;
  let file: BlockNode | undefined;
  let format: string;
  let probed = false;
  const nodes: BlockNode[] = [];
  try {
    if (tree !== undefined && options.format === undefined) {
      top = await openBlockdev(graph, withCommon(tree, base), { registry });
      nodes.push(top);
      format = top.driver.format;
      file = top.children.get("file")?.child;
    } else {
      const uri = typeof filenameOrOptions === "string" ? protocolFilename(filenameOrOptions) : undefined;
      if (tree !== undefined) {
        file = await openBlockdev(graph, withCommon(tree, base), { registry });
      } else if (uri !== undefined) {
        file = await openBlockdev(graph, withCommon(uri, { ...base, discard: "unmap" }), { registry });
      } else {
        const fileDrv = registry.require("file");
        const raw = {
          filename: filenameOrOptions as string,
          ...(options.locking === undefined ? {} : { locking: options.locking }),
        };
        const parsed: unknown = fileDrv.schema === undefined ? raw : fileDrv.schema.parse(raw);
        // QEMU: a format's protocol child defaults to discard=unmap; the format node decides what passes.
        file = await graph.open(fileDrv, parsed, { ...base, discard: "unmap", owned: false });
      }
      nodes.push(file);
      if (options.format !== undefined) {
        format = options.format;
      } else {
        const n = Math.min(PROBE_BUF_SIZE, file.length);
        const header = n > 0 ? await file.read(0, n) : new Uint8Array(0);
        format = registry.probe(
          header,
          typeof filenameOrOptions === "string" ? filenameOrOptions : undefined,
        );
        probed = true;
      }
      const driver = registry.require(format);
      if (
        format === "qcow2" &&
        driver === qcow2Driver &&
        typeof filenameOrOptions === "string" &&
        uri === undefined
      ) {
        // A qcow2 image names its backing files: open the whole chain, as qemu-img does, rather than a
        // top layer whose unallocated clusters would wrongly read as zeroes.
        for (const n of nodes.reverse()) await graph.delete(n, { force: true });
        nodes.length = 0;
        const img = await openQcow2(filenameOrOptions, {
          graph,
          writable: !readOnly,
          cacheNoFlush: options.cacheNoFlush ?? false,
          ...(options.discard === undefined ? {} : { discard: options.discard }),
          forceShare: options.forceShare ?? false,
          ...(options.locking === undefined ? {} : { locking: options.locking }),
          ...(options.resize === true ? { resize: true } : {}),
        });
        const chainFile = img.node.children.get("file")?.child;
        return {
          graph,
          node: img.node,
          file: chainFile,
          format,
          probed,
          root: img.root,
          warnings,
          close: () => img.close(),
          [Symbol.asyncDispose]: () => img.close(),
        };
      }
      if (driver.kind === "protocol") {
        // `-f file`: the protocol node is the image.
        top = file;
      } else {
        const parsed: unknown = driver.schema === undefined ? {} : driver.schema.parse({});
        const role = roleFor(driver, "file", {});
        top = await graph.open(driver, parsed, {
          ...base,
          ...(options.detectZeroes === undefined ? {} : { detectZeroes: options.detectZeroes }),
          ...(options.nodeName === undefined ? {} : { nodeName: options.nodeName }),
          children: { file: role === undefined ? { node: file } : { node: file, role } },
        });
        nodes.push(top);
      }
      if (probed && format === "raw" && !readOnly) {
        const name = typeof filenameOrOptions === "string" ? filenameOrOptions : "";
        warn(probedRawWarning(name));
        const state = top.state as Partial<RawState>;
        if ("probedGuard" in state) {
          (state as RawState).probedGuard = (sector0) => registry.probe(sector0) !== "raw";
        }
      }
    }
    let perm = PERM.CONSISTENT_READ;
    if (!readOnly) perm |= PERM.WRITE;
    if (options.resize === true) perm |= PERM.RESIZE;
    const shared = options.noShare === true ? PERM.CONSISTENT_READ | PERM.WRITE_UNCHANGED : PERM_ALL;
    const root = graph.attach(backendParent(), top, { name: "root", perm, shared });
    let closing: Promise<void> | undefined;
    const close = (): Promise<void> => {
      closing ??= (async () => {
        root.detach();
        await graph.delete(top, { force: true });
        if (
          file !== undefined &&
          file !== top &&
          graph.find(file.nodeName) === file &&
          file.parents.length === 0
        ) {
          await graph.delete(file);
        }
      })();
      return closing;
    };
    return { graph, node: top, file, format, probed, root, warnings, close, [Symbol.asyncDispose]: close };
  } catch (e) {
    for (const n of nodes.reverse()) await graph.delete(n, { force: true }).catch(() => {});
    throw e;
  }
}
