/** Runs blk-img in-process with captured output. */
import { main } from "../src/main.ts";

/** Output and exit code of one blk-img run. */
export interface Captured {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs `main(argv)` with captured stdout/stderr (stdout is not a terminal unless `isTTY`). */
export async function blk(argv: readonly string[], options: { isTTY?: boolean } = {}): Promise<Captured> {
  let stdout = "";
  let stderr = "";
  const code = await main(argv, {
    stdout: { write: (s: string) => (stdout += s) },
    stderr: { write: (s: string) => (stderr += s) },
    isTTY: options.isTTY ?? false,
    columns: 80,
  });
  return { code, stdout, stderr };
}
