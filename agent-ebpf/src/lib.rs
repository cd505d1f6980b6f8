#![no_std]
// Empty: this crate is a library only so the agent can name it as a
// build-dependency, which makes cargo rebuild the agent when it changes.
