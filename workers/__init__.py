"""Pipeline stages (distill -> validate -> publish), each a plain function; Ray wraps them later."""
