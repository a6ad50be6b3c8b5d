from dscompile.cli import main

main()
