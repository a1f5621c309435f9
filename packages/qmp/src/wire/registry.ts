/**
 * The QMP command registry: each command is declared once (name, argument schema, handler) and
 * `query-commands`, `query-version` and argument validation derive from the declarations
 * (shared/spec/qmp.md §1.3, §1.7, §3.1).
 */
import { type ArgsSchema, QmpError } from "../errors.ts";
import { firstUnexpectedMember } from "./qdict.ts";

/** The `query-version` / greeting `version` shape (QEMU's member order). */
export interface QmpVersionInfo {
  qemu: { micro: number; minor: number; major: number };
  package: string;
}

/** What a handler can see and do besides its arguments. */
export interface CommandContext {
  /** The session the command came from (`undefined` when dispatched directly, e.g. from a command line). */
  readonly session: QmpSessionHandle | undefined;
  /** Broadcasts an event to every negotiated session, now: it is written before this command's return. */
  emit(event: string, data?: Record<string, unknown>): void;
  /** Aborted when the session that sent the command goes away. */
  readonly signal: AbortSignal;
  /** Runs `fn` once this command's answer has been written (e.g. exit after `quit`). */
  afterResponse(fn: () => void | Promise<void>): void;
}

/** The part of a session a handler may use. */
export interface QmpSessionHandle {
  /** Unique per server, from 1. */
  readonly id: number;
  /** Capabilities enabled by `qmp_capabilities` (e.g. `oob`). */
  readonly capabilities: ReadonlySet<string>;
  /** Closes the session (after what was already written is flushed). */
  close(): Promise<void>;
}

/** One QMP command declaration. */
export interface CommandDefinition<A = unknown, R = unknown> {
  /** The command name, exactly as on the wire (`blockdev-add`). */
  readonly name: string;
  /**
   * Validates and types the `arguments` object (an absent `arguments` is `{}`). Without it the command takes
   * no arguments: any member is `Parameter 'NAME' is unexpected`, as QEMU answers.
   */
  readonly args?: ArgsSchema<A>;
  /** Optional check of the handler's result (a programming error if it throws: GenericError). */
  readonly returns?: ArgsSchema<R>;
  /** May be run out-of-band with `exec-oob` (no qemu-storage-daemon 7.2 command allows it). */
  readonly allowOob?: boolean;
  /** Does the work; throw {@link QmpError} with QEMU's class and text for failures. */
  handler(args: A, ctx: CommandContext): R | Promise<R>;
}

/**
 * Declares a command with its types inferred from the schema and handler.
 * @example
 * const echo = defineCommand({ name: "x-blk-echo", handler: () => ({}) });
 */
export function defineCommand<A = Record<string, never>, R = unknown>(
  definition: CommandDefinition<A, R>,
): CommandDefinition<A, R> {
  return definition;
}

/** Options of {@link CommandRegistry}. */
export interface CommandRegistryOptions {
  /** What `query-version` and the greeting report. Default QEMU 7.2.0, package `blk`. */
  version?: QmpVersionInfo;
  /** Register `qmp_capabilities`, `query-version` and `query-commands` (default true). */
  builtins?: boolean;
}

/** The version blk reports by default: the QEMU release whose behaviour it follows. */
export const DEFAULT_QMP_VERSION: QmpVersionInfo = Object.freeze({
  qemu: Object.freeze({ micro: 0, minor: 2, major: 7 }),
  package: "blk",
}) as QmpVersionInfo;

const CAPABILITIES = ["oob"] as const;

/** Arguments of `qmp_capabilities`, validated with QEMU's wording. */
export const qmpCapabilitiesArgs: ArgsSchema<{ enable: string[] }> = {
  parse(value: unknown): { enable: string[] } {
    const obj = value as Record<string, unknown>;
    const enable: string[] = [];
    // As QEMU's visitor: the declared member first, then whatever is left is unexpected.
    const list = obj.enable;
    if (list !== undefined) {
      if (!Array.isArray(list))
        throw new QmpError("GenericError", "Invalid parameter type for 'enable', expected: array");
      list.forEach((item: unknown, i) => {
        if (typeof item !== "string")
          throw new QmpError("GenericError", `Invalid parameter type for 'enable[${i}]', expected: string`);
        // QEMU names list elements NULL here, hence the famous 'null'.
        if (!(CAPABILITIES as readonly string[]).includes(item))
          throw new QmpError("GenericError", `Parameter 'null' does not accept value '${item}'`);
        enable.push(item);
      });
    }
    const extra = firstUnexpectedMember(Object.keys(obj), ["enable"]);
    if (extra !== undefined) throw new QmpError("GenericError", `Parameter '${extra}' is unexpected`);
    return { enable };
  },
};

const noArgs = (value: unknown): void => {
  const first = firstUnexpectedMember(Object.keys(value as object));
  if (first !== undefined) throw new QmpError("GenericError", `Parameter '${first}' is unexpected`);
};

/**
 * Commands by name. Handlers get validated arguments; anything a handler throws that is not a
 * {@link QmpError} becomes a GenericError carrying its message.
 * @example
 * const registry = new CommandRegistry({ version: { qemu: { micro: 0, minor: 2, major: 7 }, package: "blk 0.1.0" } });
 * registry.add(defineCommand({ name: "query-jobs", handler: () => [] }));
 */
export class CommandRegistry {
  readonly #commands = new Map<string, CommandDefinition<unknown, unknown>>();
  /** What `query-version` and the server's greeting report. */
  readonly version: QmpVersionInfo;

  constructor(options: CommandRegistryOptions = {}) {
    this.version = options.version ?? DEFAULT_QMP_VERSION;
    if (options.builtins !== false) {
      this.add({
        name: "qmp_capabilities",
        args: qmpCapabilitiesArgs,
        // Only reached in command mode: the session handles it while negotiating.
        handler: () => {
          throw new QmpError(
            "CommandNotFound",
            "Capabilities negotiation is already complete, command ignored",
          );
        },
      });
      this.add({
        name: "query-version",
        handler: (): QmpVersionInfo => ({
          qemu: {
            micro: this.version.qemu.micro,
            minor: this.version.qemu.minor,
            major: this.version.qemu.major,
          },
          package: this.version.package,
        }),
      });
      this.add({
        name: "query-commands",
        handler: (): { name: string }[] => this.names().map((name) => ({ name })),
      });
    }
  }

  /**
   * Registers a command.
   * @throws {Error} when a command of that name exists (use {@link CommandRegistry.replace} to override)
   */
  add<A, R>(definition: CommandDefinition<A, R>): this {
    if (this.#commands.has(definition.name))
      throw new Error(`QMP command '${definition.name}' is already registered`);
    this.#commands.set(definition.name, definition as CommandDefinition<unknown, unknown>);
    return this;
  }

  /** Registers or replaces a command. */
  replace<A, R>(definition: CommandDefinition<A, R>): this {
    this.#commands.set(definition.name, definition as CommandDefinition<unknown, unknown>);
    return this;
  }

  /** Removes a command; returns whether it existed. */
  remove(name: string): boolean {
    return this.#commands.delete(name);
  }

  /** The declaration of `name`, if registered. */
  get(name: string): CommandDefinition<unknown, unknown> | undefined {
    return this.#commands.get(name);
  }

  /** True when `name` is registered. */
  has(name: string): boolean {
    return this.#commands.has(name);
  }

  /** Registered command names, in registration order (what `query-commands` lists). */
  names(): string[] {
    return [...this.#commands.keys()];
  }

  /**
   * Looks up, validates and runs a command.
   * @throws {QmpError} CommandNotFound for an unknown name (`The command NAME has not been found`),
   *   GenericError for bad arguments or a failing handler, or whatever class the handler chose
   */
  async dispatch(
    name: string,
    args: Record<string, unknown> | undefined,
    ctx: CommandContext,
  ): Promise<unknown> {
    const command = this.#commands.get(name);
    if (command === undefined)
      throw new QmpError("CommandNotFound", `The command ${name} has not been found`);
    return this.run(command, args, ctx);
  }

  /**
   * Validates the arguments of a known command and runs it.
   * @throws {QmpError} as {@link CommandRegistry.dispatch}
   */
  async run(
    command: CommandDefinition<unknown, unknown>,
    args: Record<string, unknown> | undefined,
    ctx: CommandContext,
  ): Promise<unknown> {
    try {
      const raw = args ?? {};
      let parsed: unknown;
      if (command.args === undefined) {
        noArgs(raw);
        parsed = raw;
      } else parsed = command.args.parse(raw);
      const result = await command.handler(parsed, ctx);
      if (command.returns !== undefined) command.returns.parse(result);
      return result === undefined ? {} : result;
    } catch (e) {
      throw toQmpError(e);
    }
  }
}

/** Any thrown value as a {@link QmpError}: QmpErrors pass through, anything else is GenericError. */
export function toQmpError(e: unknown): QmpError {
  if (e instanceof QmpError) return e;
  const message = e instanceof Error ? e.message : String(e);
  return new QmpError("GenericError", message === "" ? "Internal error" : message, { cause: e });
}
