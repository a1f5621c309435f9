/**
 * `blockdev-create` (spec/qmp.md §3.2, jobs.md §6): a job of type `create` that waits in `concluded` for
 * `job-dismiss` and emits only `JOB_STATUS_CHANGE` (created, running, waiting, pending, concluded; null on
 * dismiss). Drivers: `file` (the file driver's create: `filename`, `size`, `preallocation`, `nocow`,
 * `extent-size-hint`) and `qcow2` (`file` is a node name or inline options; `size`, `version`,
 * `cluster-size`, `lazy-refcounts`, `refcount-bits`, `backing-file`, `backing-fmt`, `compression-type`
 * zlib, `preallocation` off, `extended-l2` false).
 *
 * qcow2 over an open node: the image is laid out by `createQcow2` (qemu-img's layout) in a private temp
 * file, then copied through a `create` job edge into the node, which is truncated to the image's length
 * first — so any protocol node works, and the daemon's own file lock is not in the way.
 */
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import {
  type BlockNode,
  CoreBlockdevOptions,
  type DriverTable,
  jobParent,
  openBlockdev,
  PERM,
  PERM_ALL,
} from "@blk/core";
import { fileDriver } from "@blk/drivers";
import { type CreateQcow2Options, createQcow2 } from "@blk/drivers/qcow2";
import { Job, type JobOptions } from "@blk/jobs";
import { BlockdevDriver, type CommandDefinition, defineCommand, q } from "@blk/qmp";
import type { DaemonState } from "../context.ts";
import { generic, qmpErrors } from "../errors.ts";

/** A `create` job: runs `work` once, with progress 0/1 → 1/1 as QEMU shows it. */
class CreateJob extends Job {
  readonly #work: () => Promise<void>;
  constructor(opts: JobOptions & { work: () => Promise<void> }) {
    const { work, ...rest } = opts;
    super({ ...rest, type: "create" });
    this.#work = work;
  }
  protected async run(): Promise<void> {
    this.progressSetRemaining(1);
    await this.#work();
    this.progressWorkDone(1);
  }
}

const BlockdevRef = q.alternate("BlockdevRef", {
  definition: q.lazy(() => CoreBlockdevOptions),
  reference: q.str(),
});
const Prealloc = q.enum(["off", "metadata", "falloc", "full"], { name: "PreallocMode" });

const CreateFile = q.object(
  {
    filename: q.str(),
    size: q.size(),
    preallocation: q.optional(Prealloc),
    nocow: q.optional(q.bool()),
    "extent-size-hint": q.optional(q.size()),
  },
  { name: "BlockdevCreateOptionsFile" },
);
const CreateQcow2 = q.object(
  {
    file: BlockdevRef,
    "data-file": q.optional(BlockdevRef),
    "data-file-raw": q.optional(q.bool()),
    "extended-l2": q.optional(q.bool()),
    size: q.size(),
    version: q.optional(q.enum(["v2", "v3"], { name: "BlockdevQcow2Version" })),
    "backing-file": q.optional(q.str()),
    "backing-fmt": q.optional(BlockdevDriver),
    encrypt: q.optional(q.any()),
    "cluster-size": q.optional(q.size()),
    preallocation: q.optional(Prealloc),
    "lazy-refcounts": q.optional(q.bool()),
    "refcount-bits": q.optional(q.int()),
    "compression-type": q.optional(q.enum(["zlib", "zstd"], { name: "Qcow2CompressionType" })),
  },
  { name: "BlockdevCreateOptionsQcow2" },
);
const CreateOptions = q.union({
  base: q.object({ driver: BlockdevDriver }),
  discriminator: "driver",
  variants: { file: CreateFile, qcow2: CreateQcow2 },
  name: "BlockdevCreateOptions",
});
const CreateArgs = q.object({ "job-id": q.str(), options: CreateOptions }, { name: "blockdev-create-arg" });

type FileArgs = ReturnType<typeof CreateFile.parse>;
type Qcow2Args = ReturnType<typeof CreateQcow2.parse>;

async function createFile(o: FileArgs): Promise<void> {
  await fileDriver.create({
    filename: o.filename,
    size: o.size,
    ...(o.preallocation === undefined ? {} : { preallocation: o.preallocation }),
    ...(o.nocow === undefined ? {} : { nocow: o.nocow }),
  });
}

function qcow2Options(o: Qcow2Args, filename: string): CreateQcow2Options {
  if (o["data-file"] !== undefined || o["data-file-raw"] === true)
    throw generic("External data files are not supported by blk yet");
  if (o.encrypt !== undefined) throw generic("Encryption is not supported by blk yet");
  if (o["extended-l2"] === true) throw generic("Extended L2 entries are not supported by blk yet");
  if ((o.preallocation ?? "off") !== "off")
    throw generic(`Preallocation mode '${String(o.preallocation)}' is not supported by blk yet`);
  if ((o["compression-type"] ?? "zlib") !== "zlib")
    throw generic(`Compression type '${String(o["compression-type"])}' is not supported by blk yet`);
  return {
    filename,
    size: o.size,
    ...(o["cluster-size"] === undefined ? {} : { clusterSize: o["cluster-size"] }),
    ...(o.version === undefined ? {} : { compat: o.version === "v2" ? "0.10" : "1.1" }),
    ...(o["lazy-refcounts"] === undefined ? {} : { lazyRefcounts: o["lazy-refcounts"] }),
    ...(o["refcount-bits"] === undefined ? {} : { refcountBits: o["refcount-bits"] }),
    ...(o["backing-file"] === undefined ? {} : { backingFile: o["backing-file"] }),
    ...(o["backing-fmt"] === undefined ? {} : { backingFormat: o["backing-fmt"] }),
  };
}

/** Lays out a qcow2 image in a temp file and copies it into `node` (truncated to the image's length). */
async function createQcow2On(node: BlockNode, jobId: string, o: Qcow2Args): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), "blkd-create-"));
  try {
    const tmp = join(dir, "image.qcow2");
    await createQcow2(qcow2Options(o, tmp));
    const image = await readFile(tmp);
    const edge = node.graph.attach(jobParent("create", jobId), node, {
      name: "file",
      perm: PERM.CONSISTENT_READ | PERM.WRITE | PERM.RESIZE,
      shared: PERM_ALL,
    });
    try {
      await edge.truncate(0);
      await edge.write(0, image);
      await edge.flush();
    } finally {
      edge.detach();
    }
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

async function createQcow2Job(state: DaemonState, jobId: string, o: Qcow2Args): Promise<void> {
  const ref = o.file;
  if (typeof ref === "string") {
    const node = state.graph.find(ref);
    if (node === undefined) throw generic(`Cannot find device='${ref}' nor node-name='${ref}'`);
    await createQcow2On(node, jobId, o);
    return;
  }
  const node = await openBlockdev(state.graph, ref, {
    drivers: state.drivers as unknown as DriverTable,
    validate: false,
  });
  try {
    await createQcow2On(node, jobId, o);
  } finally {
    if (node.parents.length === 0) await state.graph.delete(node).catch(() => {});
  }
}

/** `blockdev-create`. */
export function createCommands(state: DaemonState): CommandDefinition<never, unknown>[] {
  return [
    defineCommand({
      name: "blockdev-create",
      args: CreateArgs,
      handler: async (args) => {
        const id = args["job-id"];
        const options = args.options as { driver: string } & Record<string, unknown>;
        let work: () => Promise<void>;
        if (options.driver === "file") work = () => createFile(options as unknown as FileArgs);
        else if (options.driver === "qcow2")
          work = () => createQcow2Job(state, id, options as unknown as Qcow2Args);
        else throw generic("Driver does not support blockdev-create");
        await qmpErrors(() => {
          const job = new CreateJob({ manager: state.jobs, id, autoDismiss: false, work });
          job.start();
        });
        return {};
      },
    }),
  ] as unknown as CommandDefinition<never, unknown>[];
}
