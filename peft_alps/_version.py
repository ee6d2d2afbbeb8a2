"""The package version, in a module of its own so that low-level modules can read it without importing the
package face (which imports everything)."""

__version__ = "0.1.0"
