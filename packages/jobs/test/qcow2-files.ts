/** Jobs tests on real qcow2 files: create an image in a temp dir and open it as a node of a graph. */
import type { BlockGraph, BlockNode } from "@blk/core";
import { blkdebugDriver } from "@blk/drivers/blkdebug";
import { fileDriver } from "@blk/drivers/file";
import { createQcow2, qcow2Driver } from "@blk/drivers/qcow2";
import type { TempDir } from "@blk/testkit";

/**
 * Creates `NAME.qcow2` of `size` bytes in `dir` (backed by `backing`'s file, named relatively, when given)
 * and opens it as node `NAME` over node `NAME-file`; with `debug`, a blkdebug node `NAME-dbg` sits between
 * them so tests can inject faults into the image's file. With `headerBacking: false` the image names no
 * backing file while the node still gets `backing` as its backing child (a fleecing overlay).
 */
export async function openQcow2File(
  graph: BlockGraph,
  dir: TempDir,
  name: string,
  size: number,
  opts: { backing?: BlockNode | undefined; debug?: boolean; headerBacking?: boolean } = {},
): Promise<BlockNode> {
  const { backing } = opts;
  const filename = dir.join(`${name}.qcow2`);
  await createQcow2({
    filename,
    size,
    ...(backing === undefined || opts.headerBacking === false
      ? {}
      : { backingFile: `${backing.nodeName}.qcow2`, backingFormat: "qcow2" }),
  });
  let file = await graph.open(fileDriver, { filename }, { nodeName: `${name}-file`, owned: false });
  if (opts.debug === true) {
    file = await graph.open(
      blkdebugDriver,
      {},
      { nodeName: `${name}-dbg`, owned: false, children: { image: file } },
    );
  }
  return graph.open(
    qcow2Driver,
    {},
    { nodeName: name, children: { file, ...(backing === undefined ? {} : { backing }) } },
  );
}
