"""One task, engine-agnostic: workspace, git, session, prompt, live events, changes, one result;
and the workspace operations (open, close, git) outside any prompt."""
