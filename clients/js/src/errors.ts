/** A refusal from quickim: its HTTP status and the stable code and name of docs/api.md. */
export class QuickimError extends Error {
  /** HTTP status (0 when the request never got an answer). */
  readonly status: number;
  /** The stable numeric code (e.g. 40301), 0 for a network failure. */
  readonly code: number;

  constructor(status: number, code: number, message: string) {
    super(message);
    this.name = 'QuickimError';
    this.status = status;
    this.code = code;
  }

  /** True when the request may be retried as it is (network failure, 429, 5xx). */
  get retryable(): boolean {
    return this.status === 0 || this.status === 429 || this.status >= 500;
  }
}
