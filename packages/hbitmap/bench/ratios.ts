/**
 * Prints same-run ratios ("X: hbitmap 12.3x faster than flat") from the results vitest bench collected,
 * using medians (robust to the outliers a shared machine produces), falling back to means.
 */
interface TaskLike {
  name: string;
  tasks?: TaskLike[];
  result?: { benchmark?: { mean: number; median?: number } };
}

function typical(t: TaskLike | undefined): number | undefined {
  const b = t?.result?.benchmark;
  return b === undefined ? undefined : (b.median ?? b.mean);
}

/** Walks a finished vitest suite and prints one ratio line per group that has an `hbitmap` and a `flat` bench. */
export function printRatios(suite: unknown): void {
  const lines: string[] = [];
  const visit = (t: TaskLike): void => {
    const kids = t.tasks ?? [];
    const h = typical(kids.find((k) => k.name === "hbitmap"));
    const f = typical(kids.find((k) => k.name === "flat"));
    if (h !== undefined && f !== undefined && h > 0 && f > 0) {
      lines.push(
        f >= h
          ? `${t.name}: hbitmap ${(f / h).toFixed(1)}x faster than flat`
          : `${t.name}: hbitmap ${(h / f).toFixed(1)}x slower than flat`,
      );
    }
    for (const k of kids) visit(k);
  };
  visit(suite as TaskLike);
  if (lines.length > 0) console.log(`\nSame-run ratios (medians):\n${lines.join("\n")}`);
}
