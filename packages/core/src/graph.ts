/**
 * BlockGraph: nodes with QEMU's node names, parent → child edges named as QEMU names them, QEMU's
 * permission model per edge (needed and shared; conflicts refused with QEMU's message), filter
 * insertion/removal above a node and replacing a node under all its parents.
 */
import type { BlockDriver, BlockStatusExtent, TruncateFlags } from "./driver.ts";
import { BlkError } from "./errors.ts";
import {
  BlockNode,
  type BlockStatusAboveOptions,
  type NodeWriteOptions,
  type NodeZeroOptions,
  type RequestOptions,
} from "./node.ts";
import { type NodeOptions, resolveNodeOptions } from "./node-options.ts";
import { CHILD_ROLE, defaultChildPerm, PERM_ALL, type PermName, permDescription, permList } from "./perm.ts";

/** A parent that is not a node: an export's or a device's BlockBackend, or a block job. */
export interface ExternalParent {
  /** `x-debug-query-block-graph` node type. */
  readonly type: "block-backend" | "block-job";
  /** The name in `x-debug-query-block-graph` (`""` for unnamed backends; the job id for jobs). */
  readonly name: string;
  /** How QEMU's permission messages name it (`an unnamed block device`, `mirror job 'j0'`). */
  readonly description: string;
  /** The edge stays where it is when its child is replaced (QEMU: true for jobs' edges). */
  readonly stayAtNode?: boolean;
}

/** A BlockBackend parent (exports, devices): `block device 'NAME'` or `an unnamed block device` in messages. */
export function backendParent(name?: string): ExternalParent {
  return {
    type: "block-backend",
    name: name ?? "",
    description: name === undefined || name === "" ? "an unnamed block device" : `block device '${name}'`,
  };
}

/** A block job parent: `TYPE job 'ID'` in messages. */
export function jobParent(jobType: string, id: string): ExternalParent {
  return { type: "block-job", name: id, description: `${jobType} job '${id}'`, stayAtNode: true };
}

/** The parent end of an edge. */
export type Parent = BlockNode | ExternalParent;

const describe = (p: Parent): string => (p instanceof BlockNode ? `node '${p.nodeName}'` : p.description);

/**
 * One use of a child node by a parent (QEMU's `BdrvChild`): name (`file`, `backing`, `root`, `target`…),
 * role, and the permissions it holds (`perm`) and lets other parents hold (`shared`). I/O through an edge
 * is checked against its permissions; a write through an edge holding `resize` may extend the child.
 */
export class Edge {
  readonly graph: BlockGraph;
  readonly parent: Parent;
  readonly name: string;
  /** {@link CHILD_ROLE} bits. */
  readonly role: number;
  #child: BlockNode;
  #perm: number;
  #shared: number;
  #attached = true;

  /** @internal Use {@link BlockGraph.attach}. */
  constructor(
    graph: BlockGraph,
    parent: Parent,
    child: BlockNode,
    name: string,
    role: number,
    perm: number,
    shared: number,
  ) {
    this.graph = graph;
    this.parent = parent;
    this.#child = child;
    this.name = name;
    this.role = role;
    this.#perm = perm;
    this.#shared = shared;
  }

  /** The child node (changes when the child is replaced). */
  get child(): BlockNode {
    return this.#child;
  }
  /** Permissions held ({@link PERM} bits). */
  get perm(): number {
    return this.#perm;
  }
  /** Permissions shared with other parents. */
  get shared(): number {
    return this.#shared;
  }
  /** False once detached. */
  get attached(): boolean {
    return this.#attached;
  }

  /** @internal */
  _set(perm: number, shared: number): void {
    this.#perm = perm;
    this.#shared = shared;
  }
  /** @internal */
  _setChild(c: BlockNode): void {
    this.#child = c;
  }
  /** @internal */
  _detached(): void {
    this.#attached = false;
  }

  /**
   * Changes the permissions of an external parent's edge. On a conflict nothing changes.
   * @throws {BlkError} EPERM with QEMU's permission-conflict message
   */
  setPerm(perm: number, shared: number): void {
    if (this.parent instanceof BlockNode) {
      throw new BlkError("EINVAL", "Permissions of a node's child edge follow from its role");
    }
    const old = [this.#perm, this.#shared] as const;
    this.#perm = perm;
    this.#shared = shared;
    try {
      this.graph.refreshPerms([this.#child]);
    } catch (e) {
      this.#perm = old[0];
      this.#shared = old[1];
      throw e;
    }
  }

  /** Detaches this edge from its child (see {@link BlockGraph.detach}). */
  detach(): void {
    this.graph.detach(this);
  }

  /** Reads from the child (see {@link BlockNode.read}). */
  read(offset: number, bytes: number, opts: RequestOptions = {}): Promise<Uint8Array> {
    return this.#child.read(offset, bytes, { ...opts, via: this });
  }
  /** Reads into `buf` from the child. */
  readInto(offset: number, buf: Uint8Array, opts: RequestOptions = {}): Promise<void> {
    return this.#child.readInto(offset, buf, { ...opts, via: this });
  }
  /** Writes to the child; needs `write` (or `write-unchanged` for unchanged data); `resize` allows growing it. */
  write(offset: number, data: Uint8Array, opts: NodeWriteOptions = {}): Promise<void> {
    return this.#child.write(offset, data, { ...opts, via: this });
  }
  /** Writes zeroes to the child; needs `write`. */
  writeZeroes(offset: number, bytes: number, opts: NodeZeroOptions = {}): Promise<void> {
    return this.#child.writeZeroes(offset, bytes, { ...opts, via: this });
  }
  /** Discards on the child; needs `write`. */
  discard(offset: number, bytes: number, opts: RequestOptions = {}): Promise<void> {
    return this.#child.discard(offset, bytes, { ...opts, via: this });
  }
  /** Flushes the child. */
  flush(): Promise<void> {
    return this.#child.flush();
  }
  /** Block status of the child alone. */
  blockStatus(offset: number, bytes: number): Promise<BlockStatusExtent[]> {
    return this.#child.blockStatus(offset, bytes);
  }
  /** Block status over the child's backing chain. */
  blockStatusAbove(
    offset: number,
    bytes: number,
    opts: BlockStatusAboveOptions = {},
  ): Promise<BlockStatusExtent[]> {
    return this.#child.blockStatusAbove(offset, bytes, opts);
  }
  /** Resizes the child; needs `resize`. */
  truncate(length: number, flags: TruncateFlags = {}): Promise<void> {
    return this.#child.truncate(length, flags, { via: this });
  }
  /** Length of the child in bytes. */
  get length(): number {
    return this.#child.length;
  }
}

/** A child given to {@link BlockGraph.open}. */
export interface ChildSpec {
  node: BlockNode;
  /** {@link CHILD_ROLE} bits; default from the edge name and the driver kind. */
  role?: number;
}

/** Options of {@link BlockGraph.open}: the common node options plus name, children and ownership. */
export interface OpenNodeOptions extends Partial<NodeOptions> {
  /** `node-name`; generated (`#blockNNN`) when omitted. */
  nodeName?: string;
  /** Children to attach before the driver opens (`file`, `backing`, …). */
  children?: Record<string, BlockNode | ChildSpec>;
  /**
   * Owned by the monitor/user (true by default): deleting a parent never deletes it. Inline children
   * opened on behalf of a parent pass false, so they go away with their last parent.
   */
  owned?: boolean;
}

/** Options of {@link BlockGraph.attach}. */
export interface AttachOptions {
  /** Edge name (`file`, `backing`, `root`, `target`, `main node`, …). */
  name: string;
  /** For node parents: {@link CHILD_ROLE} bits (permissions follow from them). */
  role?: number;
  /** For external parents: permissions needed. */
  perm?: number;
  /** For external parents: permissions shared (default all). */
  shared?: number;
}

/** `x-debug-query-block-graph` result. */
export interface BlockGraphInfo {
  nodes: { id: number; type: "block-driver" | "block-backend" | "block-job"; name: string }[];
  edges: { parent: number; child: number; name: string; perm: PermName[]; "shared-perm": PermName[] }[];
}

const NAME_RE = /^[A-Za-z][A-Za-z0-9._-]*$/;

/**
 * Checks a user-given node name with QEMU's rules and messages.
 * @throws {BlkError} EINVAL `Invalid node-name: 'X'` / `Node name too long`
 */
export function checkNodeName(name: string): void {
  if (!NAME_RE.test(name)) throw new BlkError("EINVAL", `Invalid node-name: '${name}'`);
  if (name.length > 31) throw new BlkError("EINVAL", "Node name too long");
}

/** Options of {@link BlockGraph}. */
export interface BlockGraphOptions {
  /** Random source for generated names (two random digits, as QEMU); default `Math.random`. */
  random?: () => number;
}

/**
 * The graph of block nodes.
 * @example
 * const graph = new BlockGraph();
 * const file = await graph.open(memoryDriver, { size: 1 << 20 }, { nodeName: "disk-file" });
 * const exp = graph.attach(backendParent(), file, { name: "root", perm: PERM.WRITE | PERM.CONSISTENT_READ });
 */
export class BlockGraph {
  #nodes = new Map<string, BlockNode>();
  #owned = new WeakMap<BlockNode, boolean>();
  #counter = 0;
  #random: () => number;

  constructor(options: BlockGraphOptions = {}) {
    this.#random = options.random ?? Math.random;
  }

  /** Nodes by name. */
  get nodes(): ReadonlyMap<string, BlockNode> {
    return this.#nodes;
  }

  /** Nodes newest first (the order of `query-named-block-nodes`). */
  list(): BlockNode[] {
    return [...this.#nodes.values()].reverse();
  }

  /** The node named `name`, or undefined. */
  find(name: string): BlockNode | undefined {
    return this.#nodes.get(name);
  }

  /** Generates a node name as QEMU does: `#block`, a counter, two random digits. */
  generateNodeName(): string {
    for (;;) {
      const rnd = Math.floor(this.#random() * 100) % 100;
      const name = `#block${String(this.#counter++).padStart(3, "0")}${String(rnd).padStart(2, "0")}`;
      if (!this.#nodes.has(name)) return name;
    }
  }

  /**
   * Opens a node: checks the name and the common options, attaches the children (permission checks),
   * opens the driver, and adds the node to the graph. On any failure nothing is left behind.
   * @throws {BlkError} EINVAL for a bad or duplicate name or bad options; EPERM on permission conflicts
   */
  async open<O>(driver: BlockDriver<O>, options: O, opts: OpenNodeOptions = {}): Promise<BlockNode> {
    let name = opts.nodeName;
    if (name !== undefined) {
      checkNodeName(name);
      if (this.#nodes.has(name)) throw new BlkError("EEXIST", `Duplicate nodes with node-name='${name}'`);
    } else {
      name = this.generateNodeName();
    }
    const nodeOptions = resolveNodeOptions(opts);
    const node = new BlockNode({
      graph: this,
      name,
      driver: driver as BlockDriver<never>,
      options: nodeOptions,
      driverOptions: options,
    });
    const edges: Edge[] = [];
    try {
      for (const [childName, spec] of Object.entries(opts.children ?? {})) {
        const c = spec instanceof BlockNode ? { node: spec } : spec;
        const role = c.role ?? defaultRole(driver.kind, childName);
        edges.push(this.attach(node, c.node, { name: childName, role }));
      }
      const state = await driver.open(options, {
        readOnly: nodeOptions.readOnly,
        autoReadOnly: nodeOptions.autoReadOnly,
        nodeName: name,
        children: node.children,
        options: node.options,
      });
      try {
        await node._attachState(state);
        if (this.#nodes.has(name)) throw new BlkError("EEXIST", `Duplicate nodes with node-name='${name}'`);
        this.#nodes.set(name, node);
        this.#owned.set(node, opts.owned ?? true);
        this.refreshPerms([node]);
      } catch (e) {
        this.#nodes.delete(name);
        await state.close();
        throw e;
      }
    } catch (e) {
      for (const edge of edges) this.detach(edge);
      throw e;
    }
    return node;
  }

  /**
   * Attaches `child` under `parent`. A node parent's permissions follow from the edge role and the
   * parent's own users; an external parent states them. On a conflict nothing changes.
   * @throws {BlkError} EPERM with QEMU's message (`Permission conflict on node …`, `Block node is read-only`)
   */
  attach(parent: Parent, child: BlockNode, options: AttachOptions): Edge {
    if (parent instanceof BlockNode) {
      if (parent.children.has(options.name)) {
        throw new BlkError("EEXIST", `Node '${parent.nodeName}' already has a '${options.name}' child`);
      }
      if (parent === child || reaches(child, parent)) {
        throw new BlkError(
          "EINVAL",
          `Making '${child.nodeName}' a ${options.name} child of '${parent.nodeName}' would create a cycle`,
        );
      }
    }
    const edge = new Edge(
      this,
      parent,
      child,
      options.name,
      options.role ?? 0,
      parent instanceof BlockNode ? 0 : (options.perm ?? 0),
      parent instanceof BlockNode ? PERM_ALL : (options.shared ?? PERM_ALL),
    );
    child.parents.unshift(edge);
    if (parent instanceof BlockNode) parent.children.set(options.name, edge);
    try {
      this.refreshPerms(parent instanceof BlockNode ? [parent, child] : [child]);
    } catch (e) {
      this.#unlink(edge);
      this.#tryRefresh([child]);
      throw e;
    }
    return edge;
  }

  /** Detaches an edge; the child's permissions loosen (never fails). */
  detach(edge: Edge): void {
    if (!edge.attached) return;
    this.#unlink(edge);
    this.#tryRefresh([edge.child]);
  }

  #unlink(edge: Edge): void {
    const child = edge.child;
    const i = child.parents.indexOf(edge);
    if (i >= 0) child.parents.splice(i, 1);
    if (edge.parent instanceof BlockNode && edge.parent.children.get(edge.name) === edge) {
      edge.parent.children.delete(edge.name);
    }
    edge._detached();
  }

  #tryRefresh(nodes: BlockNode[]): void {
    try {
      this.refreshPerms(nodes);
    } catch {
      // Loosening permissions cannot conflict; a lock hook failing here keeps the stricter lock.
    }
  }

  /**
   * Moves every parent of `from` to `to` (QEMU `bdrv_replace_node`), except parents for which that would
   * create a cycle (a filter above `from` that is itself `to`) and edges that stay at their node (jobs').
   * On a conflict nothing changes.
   * @throws {BlkError} EPERM with QEMU's message
   */
  replaceNode(from: BlockNode, to: BlockNode): void {
    if (from === to) return;
    const moved: Edge[] = [];
    for (const edge of [...from.parents]) {
      const p = edge.parent;
      if (p instanceof BlockNode ? p === to || reaches(to, p) : p.stayAtNode === true) continue;
      moved.push(edge);
    }
    const move = (edges: Edge[], a: BlockNode, b: BlockNode): void => {
      for (const edge of edges) {
        const i = a.parents.indexOf(edge);
        if (i >= 0) a.parents.splice(i, 1);
        edge._setChild(b);
        b.parents.unshift(edge);
      }
    };
    move(moved, from, to);
    try {
      this.refreshPerms([to, from]);
    } catch (e) {
      move([...moved].reverse(), to, from);
      this.#tryRefresh([from, to]);
      throw e;
    }
  }

  /**
   * Puts `filter` above `below`: the filter (already opened with `below` as its child) takes over all of
   * `below`'s parents.
   */
  insertFilter(filter: BlockNode, below: BlockNode): void {
    const ok = [...filter.children.values()].some((e) => e.child === below);
    if (!ok) throw new BlkError("EINVAL", `'${filter.nodeName}' is not a parent of '${below.nodeName}'`);
    this.replaceNode(below, filter);
  }

  /**
   * Opens a filter node on `below` (as its `childName` child, default `file`) and inserts it above.
   * On failure the filter is closed again.
   */
  async openFilterAbove<O>(
    driver: BlockDriver<O>,
    options: O,
    below: BlockNode,
    opts: Omit<OpenNodeOptions, "children"> & {
      childName?: string;
      extraChildren?: Record<string, BlockNode | ChildSpec>;
    } = {},
  ): Promise<BlockNode> {
    const { childName = "file", extraChildren = {}, ...rest } = opts;
    const filter = await this.open(driver, options, {
      ...rest,
      owned: rest.owned ?? false,
      children: {
        [childName]: { node: below, role: CHILD_ROLE.FILTERED | CHILD_ROLE.PRIMARY },
        ...extraChildren,
      },
    });
    try {
      this.insertFilter(filter, below);
    } catch (e) {
      await this.delete(filter, { force: true });
      throw e;
    }
    return filter;
  }

  /**
   * Removes a filter: its parents go back to its filtered child, and the filter is deleted.
   * @throws {BlkError} EINVAL if `filter` has no filtered child
   */
  async removeFilter(filter: BlockNode): Promise<void> {
    const below = filter.filtered ?? filter.filteredOrBacking?.child;
    if (below === undefined) throw new BlkError("EINVAL", `'${filter.nodeName}' is not a filter`);
    this.replaceNode(filter, below);
    await this.delete(filter, { force: true });
  }

  /**
   * Deletes a node nobody uses: detaches its children (deleting those not owned that are left without
   * parents), closes it after in-flight I/O, and drops its name.
   * @throws {BlkError} EBUSY `Node NAME is in use` while it has parents
   */
  async delete(node: BlockNode, options: { force?: boolean } = {}): Promise<void> {
    if (node.parents.length > 0 && options.force !== true) {
      throw new BlkError("EBUSY", `Node ${node.nodeName} is in use`);
    }
    for (const e of [...node.parents]) this.detach(e);
    if (this.#nodes.get(node.nodeName) === node) this.#nodes.delete(node.nodeName);
    await node.close();
    for (const edge of [...node.children.values()]) {
      this.detach(edge);
      const c = edge.child;
      if (c.parents.length === 0 && this.#owned.get(c) === false) await this.delete(c);
    }
  }

  /** True if the node is owned by the user (not an inline child). */
  isOwned(node: BlockNode): boolean {
    return this.#owned.get(node) ?? false;
  }

  /**
   * Recomputes permissions below `nodes` (parents before children): refuses parent pairs whose needs
   * and sharing conflict, write permission on read-only nodes, and whatever the drivers' lock hooks refuse.
   * On failure every edge gets its old permissions back and the hooks' pending checks are aborted.
   * @throws {BlkError} EPERM with QEMU's message
   */
  refreshPerms(nodes: readonly BlockNode[]): void {
    const order = topoOrder(nodes);
    const saved = new Map<Edge, readonly [number, number]>();
    const checked: BlockNode[] = [];
    const cumulative = new Map<BlockNode, { perm: number; shared: number }>();
    try {
      for (const node of order) {
        checkParentConflicts(node);
        const cum = node.cumulativePerm;
        cumulative.set(node, cum);
        if ((cum.perm & 0x06) !== 0 && node.readOnly) {
          throw new BlkError("EPERM", "Block node is read-only");
        }
        let state: ReturnType<() => BlockNode["state"]> | undefined;
        try {
          state = node.closed ? undefined : node.state;
        } catch {
          state = undefined;
        }
        if (state?.checkPerm !== undefined) {
          checked.push(node);
          state.checkPerm(cum.perm, cum.shared);
        }
        const childPerm = node.driver.childPerm ?? defaultChildPerm;
        for (const edge of node.children.values()) {
          const np = childPerm(edge.role, cum.perm, cum.shared, !node.readOnly);
          const shared = edge.child.options.forceShare ? PERM_ALL : np.shared;
          if (!saved.has(edge)) saved.set(edge, [edge.perm, edge.shared]);
          edge._set(np.perm, shared);
        }
      }
    } catch (e) {
      for (const [edge, [p, s]] of saved) edge._set(p, s);
      for (const n of checked) {
        try {
          n.state.abortPerm?.();
        } catch {
          // Abort hooks must not throw; ignore a misbehaving one.
        }
      }
      throw e;
    }
    for (const node of order) {
      const cum = cumulative.get(node);
      if (cum === undefined || node.closed) continue;
      try {
        node.state.setPerm?.(cum.perm, cum.shared);
      } catch {
        // setPerm follows a successful checkPerm and must not fail.
      }
    }
  }

  /**
   * `x-debug-query-block-graph`: nodes and edges with their permissions. Ids are assigned as QEMU does:
   * BlockBackends first, then jobs, then nodes (newest first).
   */
  debugGraph(): BlockGraphInfo {
    const out: BlockGraphInfo = { nodes: [], edges: [] };
    const ids = new Map<Parent, number>();
    const nodes = this.list();
    const externals: ExternalParent[] = [];
    for (const n of nodes) {
      for (const e of n.parents) {
        if (!(e.parent instanceof BlockNode) && !externals.includes(e.parent)) externals.push(e.parent);
      }
    }
    const ordered: Parent[] = [
      ...externals.filter((p) => p.type === "block-backend"),
      ...externals.filter((p) => p.type === "block-job"),
      ...nodes,
    ];
    for (const p of ordered) {
      const id = ids.size + 1;
      ids.set(p, id);
      out.nodes.push({
        id,
        type: p instanceof BlockNode ? "block-driver" : p.type,
        name: p instanceof BlockNode ? p.nodeName : p.name,
      });
    }
    for (const p of ordered) {
      const edges =
        p instanceof BlockNode
          ? [...p.children.values()]
          : nodes.flatMap((n) => n.parents.filter((e) => e.parent === p));
      for (const e of edges) {
        const parent = ids.get(p);
        const child = ids.get(e.child);
        if (parent === undefined || child === undefined) continue;
        out.edges.push({
          parent,
          child,
          name: e.name,
          perm: permList(e.perm),
          "shared-perm": permList(e.shared),
        });
      }
    }
    return out;
  }
}

/** The default role of a child edge named `name` of a driver of `kind`. */
export function defaultRole(kind: BlockDriver["kind"], name: string): number {
  if (kind === "filter") {
    return name === "file" || name === "backing" ? CHILD_ROLE.FILTERED | CHILD_ROLE.PRIMARY : CHILD_ROLE.DATA;
  }
  if (name === "backing") return CHILD_ROLE.COW;
  if (name === "file") return CHILD_ROLE.DATA | CHILD_ROLE.METADATA | CHILD_ROLE.PRIMARY;
  return CHILD_ROLE.DATA;
}

/** True if `target` is `from` or below it. */
function reaches(from: BlockNode, target: BlockNode): boolean {
  if (from === target) return true;
  for (const e of from.children.values()) if (reaches(e.child, target)) return true;
  return false;
}

function topoOrder(starts: readonly BlockNode[]): BlockNode[] {
  const seen = new Set<BlockNode>();
  const post: BlockNode[] = [];
  const visit = (n: BlockNode): void => {
    if (seen.has(n)) return;
    seen.add(n);
    for (const e of n.children.values()) visit(e.child);
    post.push(n);
  };
  for (const s of starts) visit(s);
  return post.reverse();
}

function checkParentConflicts(node: BlockNode): void {
  for (const a of node.parents) {
    for (const b of node.parents) {
      if (a === b) continue;
      const denied = b.perm & ~a.shared;
      if (denied === 0) continue;
      const n = node.nodeName;
      throw new BlkError(
        "EPERM",
        `Permission conflict on node '${n}': permissions '${permDescription(denied)}' are both required by ` +
          `${describe(b.parent)} (uses node '${n}' as '${b.name}' child) and unshared by ` +
          `${describe(a.parent)} (uses node '${n}' as '${a.name}' child).`,
      );
    }
  }
}
